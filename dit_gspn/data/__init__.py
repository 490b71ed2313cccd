"""Training data: ImageNet-style folders, pre-extracted VAE latent shards, and the built-in shapes dataset."""
from .image_folder import ClassFolderImages
from .latent_shards import LatentShardDataset, ShardError, read_index
from .shapes import SHAPE_CLASSES, ShapesDataset, make_shapes
from .transforms import center_crop_arr

__all__ = ["ClassFolderImages", "LatentShardDataset", "SHAPE_CLASSES", "ShapesDataset", "ShardError",
           "center_crop_arr", "make_shapes", "read_index"]
