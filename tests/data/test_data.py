"""Datasets: synthetic generation + loader, VOC / COCO layouts on tiny fake trees, errors."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from aream_fast.data import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetLayoutError, TrainTransform,
                             build_dataset, ensure_synthetic, labels_from_mask, num_classes, read_image,
                             read_mask, write_mask)

SYN = dict(num_train=10, num_val=4, image_size=32, seed=0)


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "data", progress=False, **SYN)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- synthetic
def test_synthetic_layout(syn_root):
    files = _files(syn_root)
    assert "cls_labels.npy" in files and "synthetic_meta.json" in files
    assert (syn_root / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:06d}" for i in range(10)]
    assert len((syn_root / "ImageSets/Segmentation/val.txt").read_text().split()) == 4
    labels = np.load(syn_root / "cls_labels.npy", allow_pickle=True).item()
    assert len(labels) == 14
    saw_band = False
    for name, lab in labels.items():
        img = read_image(syn_root / "JPEGImages" / f"{name}.jpg")
        m = read_mask(syn_root / "SegmentationClassAug" / f"{name}.png")
        assert img.shape == (32, 32, 3) and m.shape == (32, 32)
        assert set(np.unique(m).tolist()) <= set(range(7)) | {255}
        assert lab.dtype == np.float32 and lab.shape == (6,) and lab.sum() >= 1
        np.testing.assert_array_equal(lab, labels_from_mask(m, 6))  # cls_labels agree with the masks
        saw_band |= bool((m == 255).any())
    assert saw_band
    assert json.loads((syn_root / "synthetic_meta.json").read_text())["image_size"] == 32


def test_synthetic_deterministic_and_cached(syn_root, tmp_path):
    again = ensure_synthetic(tmp_path / "again", progress=False, **SYN)
    assert _files(again) == _files(syn_root)
    for f in _files(syn_root):
        assert (again / f).read_bytes() == (syn_root / f).read_bytes(), f
    other = ensure_synthetic(tmp_path / "other", progress=False, **{**SYN, "seed": 1, "num_val": 0})
    a = read_mask(syn_root / "SegmentationClassAug/train_000000.png")
    b = read_mask(other / "SegmentationClassAug/train_000000.png")
    assert not np.array_equal(a, b)
    # reuse: same parameters return the folder without rewriting it
    mtime = os.stat(again / "cls_labels.npy").st_mtime_ns
    assert ensure_synthetic(again, progress=False, **SYN) == again
    assert os.stat(again / "cls_labels.npy").st_mtime_ns == mtime
    with pytest.raises(ValueError, match="was generated with"):
        ensure_synthetic(again, progress=False, **{**SYN, "num_train": 11})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a synthetic cache"):
        ensure_synthetic(tmp_path / "junk", progress=False, **SYN)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp folders left behind


def test_half_written_cache_is_refused(syn_root, tmp_path):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(syn_root, half)
    (half / "synthetic_meta.json").unlink()
    with pytest.raises(DatasetLayoutError, match="synthetic_meta.json"):
        build_dataset("synthetic", half, "train", train=False, image_size=32)


def test_synthetic_loader_round_trip(syn_root):
    ds = build_dataset("synthetic", syn_root, "val", train=False, image_size=None)
    assert len(ds) == 4 and ds.num_classes == 6 and ds.class_names[0] == "circle"
    item = ds[1]
    assert item["name"] == "val_000001"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].dtype == torch.int64 and item["label"].shape == (6,)
    raw = read_image(syn_root / "JPEGImages/val_000001.jpg")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    back = (item["image"] * std + mean) * 255
    torch.testing.assert_close(back, torch.from_numpy(raw).permute(2, 0, 1).float(), atol=1e-3, rtol=0)
    assert torch.equal(item["mask"], torch.from_numpy(read_mask(syn_root / "SegmentationClassAug/val_000001.png")).long())
    assert item["size"].tolist() == [32, 32]
    tr = build_dataset("synthetic", syn_root, "train", train=True, image_size=48)
    batch = torch.utils.data.default_collate([tr[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 48, 48) and batch["mask"].shape == (3, 48, 48)
    assert batch["label"].shape == (3, 6)
    assert set(batch["mask"].unique().tolist()) <= set(range(7)) | {255}
    pre = build_dataset("synthetic", syn_root, "val", train=False, image_size=None, preload=True)
    assert torch.equal(pre[1]["image"], item["image"]) and torch.equal(pre[1]["mask"], item["mask"])
    rs = build_dataset("synthetic", syn_root, "val", train=False, image_size=(16, 24))
    assert rs[0]["image"].shape == (3, 16, 24) and rs[0]["mask"].shape == (16, 24)


def test_train_transform_moves_image_and_mask_together():
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, 32:] = 1
    mask[32:, :32] = 2
    mask[32:, 32:] = 3
    image = np.stack([mask * 60, 255 - mask * 60, np.full_like(mask, 128)], -1).astype(np.uint8)
    t = TrainTransform(32, scale=(0.2, 1.0), jitter=0.0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for _ in range(10):
        img, m = t(image, mask)
        r = ((img * std + mean)[0] * 255).round()
        interior = torch.ones_like(m, dtype=torch.bool)
        for dy in (-2, 0, 2):  # away from label edges (bilinear mixes there)
            for dx in (-2, 0, 2):
                interior &= torch.roll(m, (dy, dx), (0, 1)) == m
        interior[:2] = interior[-2:] = False
        interior[:, :2] = interior[:, -2:] = False
        assert torch.allclose(r[interior], (m[interior] * 60).float(), atol=2)


# ---------------------------------------------------------------- fake VOC / COCO trees
def _write_tree(root, names_by_split, K, *, img_dir="JPEGImages", mask_dir="SegmentationClassAug",
                list_dir="ImageSets/Segmentation", cls_labels=None, key_suffix="", seed=0):
    rng = np.random.default_rng(seed)
    (root / list_dir).mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, names in names_by_split.items():
        (root / list_dir / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for n in names:
            sub = "train2014/" if "train2014" in n else ("val2014/" if "val2014" in n else "")
            h, w = int(rng.integers(20, 30)), int(rng.integers(20, 30))
            (root / img_dir / sub).mkdir(parents=True, exist_ok=True)
            (root / mask_dir / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / img_dir / sub / f"{n}.jpg")
            m = np.zeros((h, w), np.uint8)
            ks = rng.choice(K, size=2, replace=False)
            m[: h // 2, : w // 2] = ks[0] + 1
            m[h // 2:, w // 2:] = ks[1] + 1
            m[h // 2, :] = 255
            write_mask(root / mask_dir / sub / f"{n}.png", m)
            lab = np.zeros(K, np.float32)
            lab[ks] = 1
            labels[n + key_suffix] = lab
    if cls_labels:
        np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    return labels


@pytest.mark.parametrize("with_cls", [True, False])
def test_voc_loader(tmp_path, with_cls):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    labels = _write_tree(voc, {"train": ["2007_000032", "2007_000039"], "val": ["2008_000001"]}, 20,
                         cls_labels=with_cls)
    # root may be the parent of VOCdevkit
    ds = build_dataset("voc", tmp_path, "train", train=False, image_size=32)
    assert len(ds) == 2 and ds.num_classes == 20 and ds.files.labels is (None if not with_cls else ds.files.labels)
    for i, n in enumerate(["2007_000032", "2007_000039"]):
        item = ds[i]
        assert item["name"] == n
        np.testing.assert_array_equal(item["label"].numpy(), labels[n])
        assert item["mask"].shape == (32, 32) and item["image"].shape == (3, 32, 32)
    # PSA-style list file given as a path
    lst = tmp_path / "psa_train.txt"
    lst.write_text("/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n")
    ds2 = build_dataset("voc", voc, str(lst), train=True, image_size=16)
    assert ds2.names == ["2008_000001"] and ds2[0]["image"].shape == (3, 16, 16)


def test_voc_without_masks_uses_cls_labels(tmp_path):
    _write_tree(tmp_path, {"train_aug": ["a", "b"]}, 20, cls_labels=True)
    ds = build_dataset("voc", tmp_path, "train_aug", train=False, image_size=16, with_masks=False)
    assert "mask" not in ds[0] and ds[0]["label"].sum() == 2


def test_coco_loader(tmp_path):
    names = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    labels = _write_tree(tmp_path, {"train": names}, 80, mask_dir="SegmentationClass", list_dir="",
                         cls_labels=True, key_suffix=".jpg")
    ds = build_dataset("coco", tmp_path, "train", train=False, image_size=16)
    assert ds.num_classes == 80 == num_classes("coco")
    assert ds.image_paths[0].parent.name == "train2014"
    np.testing.assert_array_equal(ds[1]["label"].numpy(), labels[names[1] + ".jpg"])
    (tmp_path / "cls_labels.npy").unlink()  # derived from the masks instead
    ds = build_dataset("coco", tmp_path, "train", train=False, image_size=16)
    np.testing.assert_array_equal(ds[1]["label"].numpy(), labels[names[1] + ".jpg"])


# ---------------------------------------------------------------- errors
def test_bad_layout_one_clear_error(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset("voc", tmp_path, "train", train=False, image_size=16)
    msg = str(e.value)
    assert msg.startswith(f"VOC layout not found under {tmp_path}")
    assert "missing JPEGImages/" in msg and "ImageSets/Segmentation/train.txt" in msg
    with pytest.raises(DatasetLayoutError, match="COCO"):
        build_dataset("coco", tmp_path, "train", train=False, image_size=16)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_dataset("voc", tmp_path / "nope", "train", train=False, image_size=16)
    with pytest.raises(ValueError, match="dataset name"):
        build_dataset("imagenet", tmp_path, "train", train=False, image_size=16)


def test_missing_mask_image_and_label_entries_are_named(tmp_path):
    _write_tree(tmp_path, {"train": ["a", "b", "c"]}, 20, cls_labels=True)
    (tmp_path / "SegmentationClassAug" / "b.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"mask.*missing.*: b "):
        build_dataset("voc", tmp_path, "train", train=False, image_size=16)
    with open(tmp_path / "ImageSets/Segmentation/train.txt", "a") as f:
        f.write("zzz\n")
    with pytest.raises(DatasetLayoutError, match="zzz"):
        build_dataset("voc", tmp_path, "train", train=False, image_size=16, with_masks=False)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a\nc\n")
    labels = np.load(tmp_path / "cls_labels.npy", allow_pickle=True).item()
    del labels["c"]
    np.save(tmp_path / "cls_labels.npy", labels, allow_pickle=True)
    with pytest.raises(DatasetLayoutError, match="no entry in .*cls_labels.npy: c"):
        build_dataset("voc", tmp_path, "train", train=False, image_size=16)


def test_corrupt_image_error_and_skip(tmp_path):
    _write_tree(tmp_path, {"train": ["a", "b", "c"]}, 20)
    bad = tmp_path / "JPEGImages" / "b.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    ds = build_dataset("voc", tmp_path, "train", train=False, image_size=16)
    ds[0]
    with pytest.raises(CorruptImageError, match="b.jpg"):
        ds[1]
    with pytest.warns(UserWarning, match="b.jpg"):
        ds = build_dataset("voc", tmp_path, "train", train=False, image_size=16, skip_bad_images=True)
    assert ds.names == ["a", "c"] and ds.bad_images == [str(bad)]
    assert ds[1]["name"] == "c"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: no warning
        build_dataset("voc", tmp_path, "train", train=False, image_size=16, skip_bad_images=False)
