"""Fixtures shared by the stage-two tests: a tiny synthetic dataset (VOC layout) written once per session."""
import pytest

from aream_fast.data import ensure_synthetic


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A synthetic dataset of 6 train / 3 val images of 32 x 32 (ground truth in SegmentationClassAug/)."""
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "data", num_train=6, num_val=3, image_size=32,
                            progress=False)
