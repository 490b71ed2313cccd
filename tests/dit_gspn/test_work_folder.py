"""dit_gspn.work_folder: a resumable folder's recorded settings refuse a resume with other ones, and a
manifest written before newer keys existed reads them as their defaults."""
import pytest

from dit_gspn.sampling.batch import MANIFEST_DEFAULTS
from dit_gspn.work_folder import check_manifest


def test_resume_with_other_settings_is_refused(tmp_path):
    shard_dir = tmp_path / "other.npz.shards"
    check_manifest(shard_dir, {"cfg_scale": 2.0}, write=True)
    with pytest.raises(ValueError, match="cfg_scale: 2.0 then, 4.0 now"):
        check_manifest(shard_dir, {"cfg_scale": 4.0}, write=True)


def test_a_manifest_from_before_the_guidance_interval_and_shift_resumes_with_them_off(tmp_path):
    shard_dir = tmp_path / "older.npz.shards"
    check_manifest(shard_dir, {"cfg_scale": 2.0}, write=True)  # written without the two newer keys
    newer = {"cfg_scale": 2.0, "guidance_interval": None, "flow_shift": 1.0}
    check_manifest(shard_dir, newer, write=True, defaults=MANIFEST_DEFAULTS)
    with pytest.raises(ValueError, match=r"flow_shift: 1.0 then, 3.0 now"):
        check_manifest(shard_dir, {**newer, "flow_shift": 3.0}, write=True, defaults=MANIFEST_DEFAULTS)
