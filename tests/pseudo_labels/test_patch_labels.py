"""seg_to_patch_labels (official nearest rule, docs/semantics.md, "Patch labels") and pair_counts (bincount counts with
+1)."""
import pytest
import torch

from aream_fast.losses.pairs import pair_counts
from aream_fast.pseudo_labels.patch_labels import seg_to_patch_labels
from aream_fast.official.loss import patch_labels_to_affinity


def test_seg_to_patch_labels_hand_computed():
    # 1 image, 4 x 6 pixels, patch 2 -> 2 x 3 patches; each patch takes its top-left pixel.
    seg = torch.tensor(
        [[
            [0, 9, 1, 9, 2, 9],
            [9, 9, 9, 9, 9, 9],
            [255, 9, 3, 9, 4, 9],
            [9, 9, 9, 9, 9, 9],
        ]]
    )
    out = seg_to_patch_labels(seg, 2)
    assert out.dtype == torch.int64
    assert out.tolist() == [[0, 1, 2, 255, 3, 4]]


def test_seg_to_patch_labels_matches_legacy_nearest():
    # The official code uses F.interpolate(mode="nearest") down by the patch size.
    seg = torch.randint(0, 21, (3, 64, 48))
    seg[seg == 20] = 255
    ref = torch.nn.functional.interpolate(seg[:, None].float(), size=(4, 3), mode="nearest")[:, 0].long()
    assert torch.equal(seg_to_patch_labels(seg, 16), ref.reshape(3, -1))


@pytest.mark.parametrize(
    "seg, patch_size, match",
    [
        (torch.zeros(2, 30, 32, dtype=torch.long), 16, "multiples of patch_size"),
        (torch.zeros(30, 32, dtype=torch.long), 16, r"\(B, H, W\)"),
        (torch.zeros(1, 32, 32), 16, "integer"),
        (torch.zeros(1, 32, 32, dtype=torch.long), 0, "patch_size"),
    ],
)
def test_seg_to_patch_labels_bad_input(seg, patch_size, match):
    with pytest.raises(ValueError, match=match):
        seg_to_patch_labels(seg, patch_size)


def test_pair_counts_against_materialised_affinity():
    labels = torch.randint(0, 4, (3, 17))
    labels[torch.rand(3, 17) < 0.3] = 255
    aff = patch_labels_to_affinity(labels)
    n_pos, n_neg = pair_counts(labels)
    assert int(n_pos) == int((aff == 1).sum()) + 1
    assert int(n_neg) == int((aff == 0).sum()) + 1


def test_pair_counts_all_ignored_and_one_class():
    assert [int(c) for c in pair_counts(torch.full((2, 5), 255))] == [1, 1]
    # one class, 2 images x 5 patches: 2 * 25 positive ordered pairs (diagonal included), no negative.
    assert [int(c) for c in pair_counts(torch.full((2, 5), 3))] == [51, 1]


def test_pair_counts_rejects_labels_that_would_collide_or_crash():
    # label 5 with num_labels=2 would share image 1's bincount bin: a clear error instead of wrong counts
    with pytest.raises(ValueError, match="num_labels"):
        pair_counts(torch.tensor([[0, 5, 5, 1], [1, 1, 0, 0]]), num_labels=2)
    with pytest.raises(ValueError, match="ignore_index"):
        pair_counts(torch.tensor([[0, -2, 1, 1]]))
