"""dit_gspn.data.latent_shards: a latent folder without its index is named. (The dataset over a real extraction
is tested in test_extract.py, which writes one.)"""
import pytest

from dit_gspn.data import LatentShardDataset, ShardError


def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(ShardError, match="index.json not found"):
        LatentShardDataset(tmp_path)
