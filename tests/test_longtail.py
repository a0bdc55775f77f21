"""Long-tailed subsets (CIFAR-LT convention), head/medium/tail splits, post-hoc logit adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oodtune.data.imageset import DataError, ImageSet
from oodtune.data.longtail import longtail_counts, make_longtailed
from oodtune.metrics import adjust_logits, class_splits, split_accuracy

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_lt_counts_exact():
    counts = longtail_counts(5000, 10, 100)
    assert counts == CIFAR10_LT and sum(counts) == 12406


def test_cifar100_lt_counts():
    counts = longtail_counts(500, 100, 100)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5
    assert counts[:4] == [500, 477, 455, 434]


def test_longtail_counts_edge_cases():
    assert longtail_counts(7, 1, 100) == [7]
    assert longtail_counts(50, 4, 1) == [50] * 4
    with pytest.raises(ValueError, match="ρ = 100"):
        longtail_counts(5000, 10, 0.01)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10_000), st.integers(2, 200), st.floats(1.0, 500.0))
def test_longtail_counts_monotone_with_exact_ends(n_max, k, rho):
    counts = longtail_counts(n_max, k, rho)
    assert len(counts) == k and counts[0] == n_max
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert abs(counts[-1] - n_max / rho) <= 1  # floor(n_max/ρ) up to float rounding


def toy_set(per_class: int = 50, k: int = 10, labels: np.ndarray | None = None) -> ImageSet:
    """Image i has pixel value i % 256 in channel 0 and i // 256 in channel 1, so indices can be recovered."""
    lab = np.tile(np.arange(k), per_class) if labels is None else labels
    n = len(lab)
    img = np.zeros((n, 2, 2, 3), np.uint8)
    img[:, :, :, 0] = (np.arange(n) % 256)[:, None, None]
    img[:, :, :, 1] = (np.arange(n) // 256)[:, None, None]
    return ImageSet(img, lab, classes=tuple(f"c{i}" for i in range(k)), name="toy")


def indices_of(ds: ImageSet) -> np.ndarray:
    return ds.images[:, 0, 0, 0].astype(int) + 256 * ds.images[:, 0, 0, 1].astype(int)


def test_make_longtailed_takes_first_images_in_dataset_order():
    ds = toy_set()
    lt = make_longtailed(ds, 10)
    expected_counts = longtail_counts(50, 10, 10)
    # 50·0.1^(i/9), floored
    assert lt.class_counts().tolist() == expected_counts == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert lt.name == "toy-lt10"
    idx = indices_of(lt)
    for c, n in enumerate(expected_counts):
        assert idx[lt.labels == c].tolist() == np.flatnonzero(ds.labels == c)[:n].tolist()
    assert np.all(np.diff(lt.labels) >= 0)  # class by class, head first
    same = make_longtailed(ds, 10, seed=123)  # seed does not matter in dataset order
    assert np.array_equal(same.images, lt.images)


def test_make_longtailed_random_order_is_seeded():
    ds = toy_set()
    a, b = make_longtailed(ds, 10, seed=1, order="random"), make_longtailed(ds, 10, seed=1, order="random")
    c = make_longtailed(ds, 10, seed=2, order="random")
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.class_counts().tolist() == longtail_counts(50, 10, 10)
    assert not np.array_equal(a.images, make_longtailed(ds, 10).images)


def test_make_longtailed_errors():
    labels = np.repeat(np.arange(3), [40, 40, 2])  # class 2 has 2 images; n_max = 82 // 3 = 27 -> needs 2.7 -> 2
    assert make_longtailed(toy_set(labels=labels, k=3), 10).class_counts().tolist() == [27, 8, 2]
    labels = np.repeat(np.arange(3), [40, 40, 1])
    with pytest.raises(DataError, match=r"class 2 \(c2\) has 1 images .* needs 2"):
        make_longtailed(toy_set(labels=labels, k=3), 10)
    unlabelled = ImageSet(np.zeros((4, 2, 2, 3), np.uint8), None, name="u")
    with pytest.raises(DataError, match="unlabelled"):
        make_longtailed(unlabelled)


def test_class_splits_cifar10_lt_is_pascl_3_4_3():
    assert class_splits(CIFAR10_LT) == {"head": [0, 1, 2], "medium": [3, 4, 5, 6], "tail": [7, 8, 9]}
    # ranks, not indices: a permuted count vector permutes the split
    assert class_splits([50, 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83])["tail"] == [0, 8, 9]


def test_class_splits_cifar100_lt():
    counts = longtail_counts(500, 100, 100)
    rank = class_splits(counts)
    assert [len(rank[s]) for s in ("head", "medium", "tail")] == [30, 40, 30]
    shots = class_splits(counts, rule="shots")
    assert shots["head"] == list(range(35)) and shots["medium"] == list(range(35, 70))
    assert shots["tail"] == list(range(70, 100))
    assert all(counts[i] > 100 for i in shots["head"]) and all(counts[i] < 20 for i in shots["tail"])


def test_split_accuracy_hand_case():
    splits = {"head": [0], "medium": [1], "tail": [2, 3]}
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    preds = torch.tensor([0, 1, 1, 0, 3, 0])
    acc = split_accuracy(preds, labels, splits)
    assert acc == {"head": 0.5, "medium": 1.0, "tail": pytest.approx(1 / 3), "all": 0.5}
    assert math.isnan(split_accuracy([0], [0], {"head": [0], "tail": [5]})["tail"])


def test_adjust_logits_hand_case():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    expected = torch.tensor([[1 - math.log(0.8), 2 - math.log(0.2)], [3 - math.log(0.8), -math.log(0.2)]])
    torch.testing.assert_close(adjust_logits(logits, [0.8, 0.2]), expected)
    torch.testing.assert_close(adjust_logits(logits, torch.tensor([400, 100])), expected)  # counts are normalised
    torch.testing.assert_close(adjust_logits(logits, [0.8, 0.2], tau=0.0), logits)
    half = torch.tensor([[1 - 0.5 * math.log(0.8), 2 - 0.5 * math.log(0.2)]])
    torch.testing.assert_close(adjust_logits(logits[:1], [0.8, 0.2], tau=0.5), half)
    # a close call flips towards the tail class
    assert adjust_logits(torch.tensor([[1.0, 0.5]]), [0.9, 0.1]).argmax().item() == 1
    assert adjust_logits(logits.bfloat16(), [0.8, 0.2]).dtype == torch.float32


def test_adjust_logits_errors():
    with pytest.raises(ValueError, match="> 0"):
        adjust_logits(torch.zeros(1, 2), [1.0, 0.0])
    with pytest.raises(ValueError, match="one entry per class"):
        adjust_logits(torch.zeros(1, 3), [0.5, 0.5])
