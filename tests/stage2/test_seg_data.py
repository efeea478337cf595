"""Pseudo-mask dataset: joint augmentation (crop / pad 255 / flip), ground-truth folders refused, bad masks."""
import os
import shutil

import numpy as np
import pytest
import torch

from aream_fast.data import denormalize, read_mask, write_mask
from aream_fast.data.layout import DatasetLayoutError
from aream_fast.stage2.seg_data import SegTrainTransform, build_pseudo_mask_dataset


@pytest.fixture
def pseudo_masks(tiny_synthetic, tmp_path):
    """Pseudo masks of the train split: the ground truth with its top-left quarter set to background."""
    out = tmp_path / "pseudo_masks"
    out.mkdir()
    for name in (tiny_synthetic / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        m = read_mask(tiny_synthetic / "SegmentationClassAug" / f"{name}.png").copy()
        m[:16, :16] = 0
        write_mask(out / f"{name}.png", m)
    return out


def test_items(tiny_synthetic, pseudo_masks):
    ds = build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks, train=True,
                                   crop_size=40, scale_range=(0.75, 1.25))
    assert len(ds) == 6
    item = ds[0]
    assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (40, 40) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= set(range(7)) | {255}
    ev = build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks, train=False)
    raw = read_mask(pseudo_masks / f"{ev.names[1]}.png")
    assert torch.equal(ev[1]["mask"], torch.from_numpy(raw).long())  # eval: native size, the pseudo mask itself


def test_joint_transform_keeps_image_and_mask_aligned():
    """Scale 1: pad + crop + flip must move image and mask together; padding is 0 (image) and 255 (mask)."""
    h, w = 9, 13
    mask = (np.arange(h * w).reshape(h, w) % 7).astype(np.uint8)
    image = np.repeat((mask * 30)[..., None], 3, axis=2).astype(np.uint8)
    tf = SegTrainTransform(crop_size=16, scale_range=(1.0, 1.0), hflip=0.5)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        img, m = tf(image, mask)
        assert img.shape == (3, 16, 16) and m.shape == (16, 16)
        pad = m == 255
        assert pad.sum() == 16 * 16 - h * w  # every padded pixel is ignored, no image pixel is
        assert torch.all(img[:, pad] == 0)
        # undo normalisation: image value / 30 must be the mask id wherever the mask is not padding
        raw = torch.round(denormalize(img) * 255)
        assert torch.equal((raw[0][~pad] / 30).round().long(), m[~pad])
        flips.add(bool(m[0, 0] == 255))  # padding is right/bottom: a flip moves it to the left
    assert flips == {True, False}


def test_scaled_crop_shapes():
    torch.manual_seed(0)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:25] = 3
    img, m = SegTrainTransform(24, (1.5, 2.0))(np.zeros((20, 30, 3), np.uint8), mask)
    assert img.shape == (3, 24, 24) and set(m.unique().tolist()) <= {0, 3, 255}
    with pytest.raises(ValueError, match="scale_range"):
        SegTrainTransform(24, (0.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        SegTrainTransform(0)


def test_ground_truth_folders_refused(tiny_synthetic, tmp_path):
    gt = tiny_synthetic / "SegmentationClassAug"
    kw = dict(train=True, crop_size=32)
    with pytest.raises(ValueError, match="ground-truth"):  # the synthetic set's own mask folder
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=gt, **kw)
    link = tmp_path / "masks_link"
    os.symlink(gt, link)
    with pytest.raises(ValueError, match="ground-truth"):  # a link to it
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=link, **kw)
    copy = tmp_path / "my_pseudo"
    shutil.copytree(gt, copy)
    with pytest.raises(ValueError, match="pixel-identical to the ground truth"):  # a copy of it
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=copy, **kw)
    named = tmp_path / "elsewhere" / "SegmentationClass"
    shutil.copytree(gt, named)
    with pytest.raises(ValueError, match="named like a ground-truth folder"):  # a VOC GT folder name
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=named, **kw)


def test_missing_and_bad_masks(tiny_synthetic, pseudo_masks):
    names = sorted(p.stem for p in pseudo_masks.glob("*.png"))
    kw = dict(train=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks / "nope", **kw)
    (pseudo_masks / f"{names[0]}.png").unlink()
    with pytest.raises(DatasetLayoutError, match=names[0]):
        build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks, **kw)
    write_mask(pseudo_masks / f"{names[0]}.png", np.zeros((31, 32), np.uint8))  # wrong size
    ds = build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks, **kw)
    i = ds.names.index(names[0])
    with pytest.raises(ValueError, match="has size"):
        ds[i]
    bad = np.zeros((32, 32), np.uint8)
    bad[3, 3] = 9  # 6 synthetic classes: ids 0..6 and 255 only
    write_mask(pseudo_masks / f"{names[0]}.png", bad)
    ds = build_pseudo_mask_dataset("synthetic", tiny_synthetic, "train", masks=pseudo_masks, **kw)
    with pytest.raises(ValueError, match=r"\[9\]"):
        ds[i]
