"""The official formulation (aream_fast.official) runs the SAME weights as our model and computes the
SAME loss, gradients and pseudo labels as our fused path, given the same weights / inputs / pseudo labels.

Tiny MCTformer (D = 32, 4 blocks, 2 heads, K = 3), drop_path 0 so that both sides are deterministic.
"""
import pytest
import torch
import torch.nn.functional as F

from aream_fast.official.loss import official_affinity_loss, official_seg_to_aff
from aream_fast.official.model import OfficialMCTformerV2
from aream_fast.official.pseudo_labels import OfficialPAR, gen_msf_cam, official_cam_to_seg, official_pseudo_affinity
from aream_fast.official.step import official_training_step
from aream_fast.pseudo_labels.labels import fuse_segs
from aream_fast.models import build_model
from aream_fast.models.records import AttentionRequest

K, D, DEPTH, HEADS, PATCH = 3, 32, 4, 2, 16
SUPERVISED = (2, 3)


def _tiny_model(img_size=64, drop_path=0.0):
    torch.manual_seed(0)
    return build_model("mct_deit_small", num_classes=K, img_size=img_size, drop_path=drop_path, embed_dim=D,
                       depth=DEPTH, num_heads=HEADS)


def _batch(b=2, hw=(64, 64), seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, *hw, generator=g)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])[:b]
    return images, labels


def _patch_labels_to_seg(patch_labels, grid):
    """(B, P) -> (B, h*16, w*16): every pixel of a patch gets the patch's label (so seg_to_aff recovers it)."""
    b = patch_labels.shape[0]
    seg = patch_labels.view(b, 1, *grid).float()
    return F.interpolate(seg, scale_factor=PATCH, mode="nearest").squeeze(1).long()


def test_twin_loads_our_weights_and_matches_our_forward():
    model = _tiny_model().eval()
    twin = OfficialMCTformerV2.from_model(model).eval()
    assert set(twin.state_dict()) == set(model.state_dict())
    for hw in [(64, 64), (80, 48)]:  # stored grid, then an interpolated position embedding
        images, _ = _batch(hw=hw)
        ours = model(images, AttentionRequest(supervised_layers=SUPERVISED))
        cls_b, patch_b, cam_b, z = twin(images)
        torch.testing.assert_close(cls_b, ours.class_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patch_b, ours.patch_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cam_b, ours.cam, rtol=1e-5, atol=1e-5)
        n = K + (hw[0] // PATCH) * (hw[1] // PATCH)
        assert z.shape == (DEPTH, 2, HEADS, n, n) and z.requires_grad
        rec = ours.records
        for layer in SUPERVISED:  # Z_l = scale q k^T from our records
            zl = rec.scale * rec.qs[layer] @ rec.ks[layer].transpose(-2, -1)
            torch.testing.assert_close(z[layer], zl, rtol=1e-4, atol=1e-5)


def test_official_loss_and_gradients_equal_reference_and_ours():
    """Same weights, inputs and pseudo labels: official loss on (B, P, P) == aream_loss_reference == ours, and
    one backward gives the same parameter gradients."""
    from aream_fast.losses.aream import aream_loss
    from aream_fast.official.loss import aream_loss_reference
    from benchmarks.step_cases import make_ours_step, ours_training_step

    model = _tiny_model().train()
    twin = OfficialMCTformerV2.from_model(model).train()
    images, labels = _batch(b=3)
    grid = (4, 4)
    g = torch.Generator().manual_seed(3)
    patch_labels = torch.randint(0, K + 1, (3, 16), generator=g)
    patch_labels[torch.rand(3, 16, generator=g) < 0.2] = 255
    aff = official_seg_to_aff(_patch_labels_to_seg(patch_labels, grid))

    _, _, _, z = twin(images)
    official = official_affinity_loss(z, aff, num_prefix_tokens=K, supervised_layers=SUPERVISED)
    reference = aream_loss_reference([z[l] for l in SUPERVISED], patch_labels, num_prefix_tokens=K)
    rec = model(images, AttentionRequest(supervised_layers=SUPERVISED)).records
    ours = aream_loss([rec.qs[l] for l in SUPERVISED], [rec.ks[l] for l in SUPERVISED], patch_labels,
                      scale=rec.scale, num_prefix_tokens=K)
    torch.testing.assert_close(official, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)

    # one full step (cls + 0.1 aff) without optimizer: same loss terms, same gradients
    t_base = official_training_step(twin, None, images, labels, par=None, supervised_layers=SUPERVISED, aff=aff)
    step = make_ours_step(model, par=OfficialPAR(), supervised_layers=SUPERVISED)  # the engine's AReAMStep
    step.labeler.from_model = lambda *args, **kwargs: patch_labels  # same pseudo labels on both sides
    t_ours = ours_training_step(step, None, images, labels)
    for key in ("loss", "loss_cls", "loss_aff"):
        torch.testing.assert_close(t_ours[key], t_base[key], rtol=1e-5, atol=1e-6)
    grads_b = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert grads_b[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # the supervised layers' q/k projections did get an AReAM gradient
    assert model.blocks[SUPERVISED[0]].attn.qkv.weight.grad.abs().sum() > 0


def test_official_seg_to_aff_matches_patch_label_rule():
    """seg_to_aff samples the top-left pixel of each patch: T from it == our seg_to_patch_labels + pair rule."""
    from aream_fast.pseudo_labels.patch_labels import seg_to_patch_labels
    from aream_fast.official.loss import patch_labels_to_affinity

    g = torch.Generator().manual_seed(5)
    seg = torch.randint(0, K + 1, (2, 48, 64), generator=g)
    seg[torch.rand(2, 48, 64, generator=g) < 0.3] = 255
    aff = official_seg_to_aff(seg)
    assert aff.shape == (2, 12, 12) and aff.dtype == torch.int64
    pl = seg_to_patch_labels(seg, PATCH)
    torch.testing.assert_close(aff, patch_labels_to_affinity(pl).to(aff.dtype))


def test_official_par_matches_ours():
    from aream_fast.pseudo_labels.par import PAR

    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 40, 36, generator=g) * 50 + 120
    masks = torch.softmax(torch.randn(2, 4, 40, 36, generator=g), dim=1)
    torch.testing.assert_close(PAR()(images, masks), OfficialPAR()(images, masks), rtol=1e-4, atol=1e-5)


def test_fuse_segs_rule():
    seg_l = torch.tensor([[[0, 0, 2, 3]]])
    seg_h = torch.tensor([[[0, 1, 0, 3]]])
    assert fuse_segs(seg_l, seg_h).tolist() == [[[0, 1, 255, 3]]]


def test_official_pseudo_labels_match_ours():
    """gen_msf_cam (materialised, separate forward with flip) == our pseudo_label_cams; the fused pseudo labels
    (two scores, PAR, fusion, patch sampling) agree with the official per-image loop + seg_to_aff."""
    from aream_fast.pseudo_labels.cam import pseudo_label_cams
    from aream_fast.pseudo_labels.par import PAR
    from aream_fast.pseudo_labels.patch_labels import seg_to_patch_labels
    from aream_fast.pseudo_labels.labels import cams_to_patch_labels

    model = _tiny_model().eval()
    twin = OfficialMCTformerV2.from_model(model).eval()
    images, labels = _batch(b=3, hw=(64, 48))
    layer_index = SUPERVISED[0]
    cams_off = gen_msf_cam(twin, images, labels, refine_layers=range(layer_index))
    cams_ours = pseudo_label_cams(model, images, labels, refine_layers=tuple(range(layer_index)),
                                  class_attention_layers=tuple(range(DEPTH)), flip=True)
    # fp32 rounding only (min-max normalisation of an untrained model's small-range CAMs amplifies it; both
    # sides are ~6e-5 from a float64 run of the official formulation)
    torch.testing.assert_close(cams_ours, cams_off, rtol=1e-3, atol=2e-4)

    seg_off, aff = official_pseudo_affinity(twin, images, labels, par=OfficialPAR(), layer_index=layer_index)
    _, pl_ours = cams_to_patch_labels(images, cams_ours, labels, par=PAR(), patch_size=PATCH)
    pl_off = seg_to_patch_labels(seg_off, PATCH)
    agree = (pl_ours == pl_off).float().mean().item()
    assert agree >= 0.95, f"pseudo patch labels agree on only {agree:.3f} of patches"
    assert aff.shape == (3, 12, 12)


def test_official_cam_to_seg_only_present_classes():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    cams = torch.rand(2, K, 32, 32, generator=g) * labels[:, :, None, None]
    seg = official_cam_to_seg(OfficialPAR(num_iters=2), images, labels, cams, 0.35)
    assert seg.shape == (2, 32, 32) and seg.dtype == torch.int64
    assert set(seg[0].unique().tolist()) <= {0, 2}
    assert set(seg[1].unique().tolist()) <= {0, 1, 3}


def test_bad_input_raises():
    model = _tiny_model()
    twin = OfficialMCTformerV2.from_model(model)
    with pytest.raises(ValueError, match="images"):
        twin(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="images"):
        twin(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="supervised_layers"):
        official_affinity_loss(torch.zeros(4, 1, 2, 7, 7), torch.zeros(1, 4, 4, dtype=torch.long),
                               num_prefix_tokens=3, supervised_layers=())
    vit = build_model("vit_small", num_classes=K, img_size=64, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        OfficialMCTformerV2.from_model(vit)


def test_official_training_step_updates_weights():
    model = _tiny_model(drop_path=0.1)
    twin = OfficialMCTformerV2.from_model(model).train()
    images, labels = _batch(b=2)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    before = twin.blocks[3].attn.qkv.weight.detach().clone()
    terms = official_training_step(twin, opt, images, labels, par=OfficialPAR(num_iters=2),
                                   supervised_layers=SUPERVISED)
    assert torch.isfinite(terms["loss"]) and terms["loss_aff"] > 0
    assert not torch.equal(before, twin.blocks[3].attn.qkv.weight)


def test_gen_msf_cam_same_on_twin_and_on_our_model():
    """The one official gen_msf_cam runs an OfficialMCTformerV2 or a WSSSViT (through forward_with_logits); on the
    same weights both give the same CAMs, 'U' and 'E', with two scales."""
    model = _tiny_model().eval()
    twin = OfficialMCTformerV2.from_model(model).eval()
    images, labels = _batch(b=2, hw=(64, 96))
    for weights in (None, [0.3, 0.9]):
        a = gen_msf_cam(model, images, labels, refine_layers=(0, 1), refine_weights=weights, scales=(1.0, 0.5))
        b = gen_msf_cam(twin, images, labels, refine_layers=(0, 1), refine_weights=weights, scales=(1.0, 0.5))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert a.shape == (2, K, 64, 96) and float(a.max()) > 0.9  # min-max: the maximum is ~1


def test_official_seg_to_aff_rejects_bad_seg():
    with pytest.raises(ValueError, match="seg must be a"):
        official_seg_to_aff(torch.zeros(2, 32, dtype=torch.long))
