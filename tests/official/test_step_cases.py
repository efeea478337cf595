"""benchmarks.step_cases: the four benchmark modes build and run one full step on a tiny model, from the same
weights and batch, and agree where they must (same classification loss; same AReAM loss for official vs ours
when the pseudo labels agree)."""
import pytest
import torch

from benchmarks.step_cases import STEP_MODES, build_step_case, check_mode, make_ours_step, synthetic_batch

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def test_all_modes_one_step_same_weights():
    terms = {}
    weights = {}
    for mode in STEP_MODES:
        case = build_step_case(mode, img_size=48, batch=2, num_classes=3, supervised_layers=(2, 3), drop_path=0.0,
                               model_kwargs=TINY, seed=0)
        weights[mode] = case.model.blocks[3].attn.qkv.weight.detach().clone()
        terms[mode] = case.step()
        assert torch.isfinite(terms[mode]["loss"]), mode
        assert not torch.equal(weights[mode], case.model.blocks[3].attn.qkv.weight), f"{mode}: no optimizer step"
    for mode in STEP_MODES[1:]:
        torch.testing.assert_close(weights[mode], weights["official"])  # same initial weights
        torch.testing.assert_close(terms[mode]["loss_cls"], terms["official"]["loss_cls"], rtol=1e-5, atol=1e-6)
    assert "loss_aff" not in terms["cls-only"]
    for mode in ("official", "ours", "ours-reuse"):
        assert terms[mode]["loss_aff"] > 0, mode
    # drop_path 0, so both sides are deterministic: ours' pseudo labels come from the same CAMs as the official ones
    torch.testing.assert_close(terms["ours"]["loss_aff"], terms["official"]["loss_aff"], rtol=2e-2, atol=1e-3)


def test_synthetic_batch_and_mode_checks():
    images, labels = synthetic_batch(3, 32, 5, seed=1)
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3, 5)
    assert (labels.sum(1) == 2).all()
    torch.testing.assert_close(synthetic_batch(3, 32, 5, seed=1)[0], images)
    with pytest.raises(ValueError, match="mode"):
        check_mode("fast")
    with pytest.raises(ValueError, match="batch"):
        synthetic_batch(0, 32, 5)
    case = build_step_case("cls-only", img_size=32, batch=1, num_classes=3, supervised_layers=(2, 3),
                           model_kwargs=TINY)
    with pytest.raises(ValueError, match="supervised_layers"):
        make_ours_step(case.model, par=None, supervised_layers=(1, 2), aream=False)
