"""aream_loss_reference (the official formulation) against a hand-computed case."""
import math

import pytest
import torch

from aream_fast.official.loss import aream_loss_reference, patch_labels_to_affinity


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_affinity_matches_official_seg_to_aff():
    labels = torch.tensor([[1, 1, 2, 255]])
    expected = [[1, 1, 0, 255], [1, 1, 0, 255], [0, 0, 1, 255], [255, 255, 255, 255]]
    assert patch_labels_to_affinity(labels).tolist() == [expected]


def test_reference_hand_computed():
    # B=1, H=2, C=1 prefix token, P=3 patches with labels [0, 0, 5]; layer 2 weighted 0.5.
    z1 = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4) / 10 - 1
    z2 = -z1
    labels = torch.tensor([[0, 0, 5]])
    loss = aream_loss_reference([z1, z2], labels, num_prefix_tokens=1, layer_weights=[1.0, 0.5])

    def layer_loss(z):
        s = [[_sig(float(z[0, :, 1 + i, 1 + j].mean())) for j in range(3)] for i in range(3)]
        same = lambda i, j: (labels[0, i] == labels[0, j]).item()  # noqa: E731
        pos = [(i, j) for i in range(3) for j in range(3) if same(i, j)]
        neg = [(i, j) for i in range(3) for j in range(3) if not same(i, j)]
        assert len(pos) == 5 and len(neg) == 4
        return 0.5 * sum(1 - s[i][j] for i, j in pos) / 6 + 0.5 * sum(s[i][j] for i, j in neg) / 5

    expected = (layer_loss(z1) + 0.5 * layer_loss(z2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_reference_ignores_and_all_ignored():
    z = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 5), 255)
    loss = aream_loss_reference([z], labels)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("ignore_index", [0, 1, -1, 7])
def test_reference_ignore_index_is_only_a_label_value(ignore_index):
    # The loss depends on the label partition only: relabelling the ignored patches to any ignore_index
    # (0 and 1 included, which collide with the 0 / 1 pair codes of the official T) gives the same value.
    torch.manual_seed(3)
    logits = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    labels = torch.tensor([[2, 3, 255, 2, 4, 4, 3], [5, 255, 2, 2, 6, 255, 5]])
    expected = aream_loss_reference(logits, labels, num_prefix_tokens=2)
    relabelled = labels.clone()
    relabelled[labels == 255] = ignore_index
    got = aream_loss_reference(logits, relabelled, num_prefix_tokens=2, ignore_index=ignore_index)
    torch.testing.assert_close(got, expected)


def test_affinity_rejects_ambiguous_ignore_index():
    with pytest.raises(ValueError, match="ignore_index"):
        patch_labels_to_affinity(torch.zeros(1, 3, dtype=torch.int64), ignore_index=1)


def test_reference_rejects_float_patch_labels():
    with pytest.raises(ValueError, match="patch_labels"):
        aream_loss_reference([torch.randn(1, 1, 4, 4)], torch.zeros(1, 4))


def test_reference_rejects_batch_mismatch():
    # (1, ...) logits against (2, P) labels used to broadcast silently
    with pytest.raises(ValueError, match="batch size"):
        aream_loss_reference([torch.randn(1, 2, 5, 5)], torch.zeros(2, 4, dtype=torch.int64), num_prefix_tokens=1)
