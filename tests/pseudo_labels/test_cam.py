"""aream_fast.pseudo_labels.cam against the official formulation (materialised attention, aream_fast.official):
docs/semantics.md, "CAM refinement" (gen_msf_cam), the from-forward variant, and "Inference CAMs" (seeds + npy
format)."""
import numpy as np
import pytest
import torch

from aream_fast.pseudo_labels.cam import cams_from_output, inference_cam, pseudo_label_cams
from aream_fast.pseudo_labels.seeds import load_cam_npy, save_cam_npy
from aream_fast.models import build_model
from aream_fast.official.model import forward_with_logits
from aream_fast.official.pseudo_labels import cams_from_logits_reference, gen_msf_cam, inference_cam_reference
from aream_fast.models.records import AttentionRequest

TINY = dict(embed_dim=48, num_heads=3, depth=4)


def _model(name, k, img_size=224):
    model = build_model(name, k, img_size=img_size, drop_path=0.0, **TINY)
    with torch.no_grad():
        # Trained-like conditioning: with the 0.02 init the attention of a random tiny model is almost uniform,
        # the refined CAM is nearly flat (range ~1% of its value) and min-max magnifies fp32 rounding 100x.
        # Wider q/k weights give peaked attention (as trained ViTs have); a non-trivial conv head.
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.3)
        model.head.weight.normal_(0, 0.2)
    return model


def _labels(b, k):
    labels = torch.zeros(b, k)
    labels[:, 0] = 1
    labels[-1, k - 1] = 1
    return labels


@pytest.mark.parametrize("name,size,scales,weights", [
    ("mct_deit_small", (224, 224), (1.0,), None),
    ("mct_deit_small", (64, 96), (1.0, 0.5), [0.2, 0.9, 0.5]),
    ("vit_small", (224, 224), (1.0,), [1.0, 0.0, 0.5]),
    ("vit_small", (80, 48), (1.0,), None),
])
def test_pseudo_label_cams_match_official(name, size, scales, weights):
    k = 6
    model = _model(name, k, img_size=224 if size == (224, 224) else 64).train()  # official: train mode
    images = torch.randn(2, 3, *size)
    labels = _labels(2, k)
    refine = (0, 1, 2)
    got = pseudo_label_cams(model, images, labels, refine_layers=refine, refine_weights=weights, scales=scales)
    want = gen_msf_cam(model, images, labels, refine_layers=refine, refine_weights=weights,
                                 scales=scales)
    assert model.training  # the model stays in its mode
    assert got.shape == (2, k, *size) and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
    assert float(got[0, 1:].abs().max()) == 0.0  # absent classes are zero
    assert float(got[:, 0].amax(dim=(1, 2)).min()) > 0.99  # present classes reach ~1


def test_pseudo_label_cams_class_attention_layers_and_no_flip():
    model = _model("mct_deit_small", 4, img_size=64).eval()
    images, labels = torch.randn(1, 3, 64, 48), torch.ones(1, 4)
    got = pseudo_label_cams(model, images, labels, refine_layers=(1, 3), class_attention_layers=(2, 3),
                            refine_weights={1: 0.5, 3: 1.0}, flip=False)
    want = gen_msf_cam(model, images, labels, refine_layers=(1, 3), class_attention_layers=(2, 3),
                                 refine_weights=[0.5, 1.0], flip=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,hw", [("mct_deit_small", (64, 96)), ("vit_small", (64, 96)),
                                     ("mct_deit_small", (224, 224))])
def test_cams_from_output_matches_official(name, hw):
    k = 5
    model = _model(name, k, img_size=64).eval()
    images, labels = torch.randn(2, 3, *hw), _labels(2, k)
    request = AttentionRequest(supervised_layers=(2, 3), refine_layers=(0, 1, 2), class_attention_layers=(0, 1, 2, 3))
    out = model(images, request)
    got = cams_from_output(out, labels, hw, refine_layers=(0, 1, 2), refine_weights=[0.3, 0.6, 0.9])
    _, _, cam, logits = forward_with_logits(model, images)
    want = cams_from_logits_reference(cam, logits, labels, hw, num_prefix_tokens=model.num_prefix_tokens,
                                      refine_layers=(0, 1, 2), refine_weights=[0.3, 0.6, 0.9])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not got.requires_grad


@pytest.mark.parametrize("name,hw,scales", [("mct_deit_small", (50, 70), (1.0,)), ("vit_small", (224, 224), (1.0,)),
                                            ("mct_deit_small", (64, 96), (1.0, 0.5))])
def test_inference_cam_matches_official(name, hw, scales, tmp_path):
    k = 5
    model = _model(name, k, img_size=224 if hw == (224, 224) else 64).train()
    image = torch.randn(3, *hw)
    labels = torch.tensor([1.0, 0, 1, 0, 1])
    keys, cam = inference_cam(model, image, labels, scales=scales)
    ref_keys, ref_cam = inference_cam_reference(model, image, labels, scales=scales)
    assert model.training  # mode restored
    np.testing.assert_array_equal(keys, [0, 2, 4])
    np.testing.assert_array_equal(keys, ref_keys)
    assert cam.dtype == np.float32 and cam.shape == (3, *hw)
    np.testing.assert_allclose(cam, ref_cam, rtol=0, atol=1e-5)
    path = tmp_path / "img.npy"
    save_cam_npy(path, keys, cam)
    raw = np.load(path, allow_pickle=True).item()  # the official reader
    assert set(raw) == {"key", "cam"} and raw["key"].dtype == np.int64 and raw["cam"].dtype == np.float32
    k2, c2 = load_cam_npy(path)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(c2, cam)


def test_cam_bad_inputs(tmp_path):
    model = _model("mct_deit_small", 3, img_size=64)
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="labels"):
        pseudo_label_cams(model, images, torch.ones(1, 4), refine_layers=(0,))
    with pytest.raises(ValueError, match="refine_layers"):
        pseudo_label_cams(model, images, torch.ones(1, 3), refine_layers=(7,))
    with pytest.raises(ValueError, match="refine_weights"):
        pseudo_label_cams(model, images, torch.ones(1, 3), refine_layers=(0, 1), refine_weights=[1.0])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pseudo_label_cams(model, torch.randn(1, 3, 60, 64), torch.ones(1, 3), refine_layers=(0,))
    with pytest.raises(ValueError, match="scale 0.7 turns the 64x64 images into 44x44"):
        pseudo_label_cams(model, images, torch.ones(1, 3), refine_layers=(0,), scales=(1.0, 0.7))
    out = model(images, AttentionRequest(refine_layers=(0,)))
    with pytest.raises(ValueError, match="refine layers"):
        cams_from_output(out, torch.ones(1, 3), (64, 64), refine_layers=(1,))
    with pytest.raises(ValueError, match="class_attention"):
        cams_from_output(out, torch.ones(1, 3), (64, 64), refine_layers=(0,))
    with pytest.raises(ValueError, match="image must be"):
        inference_cam(model, images, torch.ones(3))
    keys, cam = inference_cam(model, images[0], torch.zeros(3))
    assert keys.shape == (0,) and cam.shape == (0, 64, 64)
    with pytest.raises(FileNotFoundError):
        load_cam_npy(tmp_path / "missing.npy")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(ValueError, match="arr.npy"):
        load_cam_npy(tmp_path / "arr.npy")


@pytest.mark.parametrize("name,flip", [("mct_deit_small", True), ("mct_deit_small", False), ("vit_small", True)])
def test_present_only_is_the_full_map_of_present_classes(name, flip):
    model = _model(name, 5, img_size=64).train()
    images = torch.randn(3, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    full = pseudo_label_cams(model, images, labels, refine_layers=(0, 1, 2), flip=flip, scales=(1.0, 0.5))
    torch.manual_seed(0)
    packed = pseudo_label_cams(model, images, labels, refine_layers=(0, 1, 2), flip=flip, scales=(1.0, 0.5),
                               present_only=True)
    assert packed.cams.shape == (3, 3, 64, 64)
    assert packed.classes.tolist() == [[0, 2, 4], [0, 0, 0], [1, 0, 0]]
    for b in range(3):
        for j in range(3):
            if packed.valid[b, j]:
                torch.testing.assert_close(packed.cams[b, j], full[b, packed.classes[b, j]], rtol=0, atol=1e-6)
            else:
                assert float(packed.cams[b, j].abs().max()) == 0.0
    out = model.eval()(images, AttentionRequest(supervised_layers=(3,), refine_layers=(0, 1),
                                                class_attention_layers=(0, 1, 2, 3)))
    full = cams_from_output(out, labels, (64, 64), refine_layers=(0, 1))
    packed = cams_from_output(out, labels, (64, 64), refine_layers=(0, 1), present_only=True)
    torch.testing.assert_close(packed.cams[0], full[0, [0, 2, 4]], rtol=0, atol=1e-6)
    none = cams_from_output(out, torch.zeros(3, 5), (64, 64), refine_layers=(0, 1), present_only=True)
    assert none.cams.shape == (3, 0, 64, 64) and none.classes.shape == (3, 0)
