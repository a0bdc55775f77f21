"""Balanced Energy step 1: counting the pretrained model's predictions on outliers, P_γ, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from oodtune.losses.prior import OutlierPrior, PriorError, count_outlier_predictions, prior_from_counts


def one_hot_logits(classes: list[int], k: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), k).float() * 5.0


class FakeNet(nn.Module):
    """Returns the batch itself as logits (plus dummy features); records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes.append(self.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        return x, torch.zeros(len(x), 4)


def test_count_with_fake_module_eval_no_grad_and_mode_restored():
    net = FakeNet().train()
    batches = [one_hot_logits([0, 2, 2]), one_hot_logits([2, 1])]
    counts = count_outlier_predictions(net, batches, 3)
    assert counts.tolist() == [1, 1, 3] and counts.dtype == torch.int64
    assert net.modes == [False, False] and net.grad_enabled == [False, False]
    assert net.training  # restored


def test_count_with_plain_callable_and_shape_check():
    assert count_outlier_predictions(lambda t: t, [one_hot_logits([1, 1])], 3).tolist() == [0, 2, 0]
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        count_outlier_predictions(lambda t: t, [one_hot_logits([1])], 4)


def test_prior_gamma_powers():
    counts = [3, 1]
    torch.testing.assert_close(prior_from_counts(counts, 1.0), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(prior_from_counts(counts, 0.0), torch.tensor([0.5, 0.5]))
    # 0.75² = 0.5625, 0.25² = 0.0625 -> / 0.625
    torch.testing.assert_close(prior_from_counts(counts, 2.0), torch.tensor([0.9, 0.1]))
    # γ = 0.5: sqrt(3)/(sqrt(3)+1)
    torch.testing.assert_close(prior_from_counts(counts, 0.5), torch.tensor([3**0.5 / (3**0.5 + 1), 1 / (3**0.5 + 1)]))


def test_prior_zero_counts_and_invalid():
    torch.testing.assert_close(prior_from_counts([2, 0, 2], 0.5), torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(prior_from_counts([2, 0, 2], 0.0), torch.full((3,), 1 / 3))
    with pytest.raises(PriorError, match="all outlier counts are zero"):
        prior_from_counts([0, 0, 0])
    with pytest.raises(PriorError, match="non-negative"):
        prior_from_counts([1, -1])
    with pytest.raises(PriorError, match="gamma"):
        prior_from_counts([1, 1], -1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=20).filter(lambda c: sum(c) > 0),
       st.floats(0.0, 3.0))
def test_prior_is_a_distribution_preserving_order(counts, gamma):
    p = prior_from_counts(counts, gamma)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (p >= 0).all()
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    assert all(p[a] <= p[b] + 1e-7 for a, b in zip(order, order[1:], strict=False))


def test_outlier_prior_methods():
    prior = OutlierPrior(counts=[3, 1], gamma=2.0, class_names=["cat", "dog"])
    torch.testing.assert_close(prior.probabilities(), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(prior.gamma_prior(), torch.tensor([0.9, 0.1]))
    assert prior.num_classes == 2
    with pytest.raises(PriorError, match="2 counts but 3 class names"):
        OutlierPrior(counts=[3, 1], gamma=1.0, class_names=["a", "b", "c"])
    with pytest.raises(PriorError, match="non-negative"):
        OutlierPrior(counts=[3, -1])


def test_save_load_roundtrip_and_refuse_overwrite(tmp_path):
    path = tmp_path / "sub" / "prior.json"
    prior = OutlierPrior(counts=[5, 0, 2], gamma=0.05, class_names=["a", "b", "c"])
    assert prior.save(path) == path
    loaded = OutlierPrior.load(path)
    assert loaded == prior
    torch.testing.assert_close(loaded.gamma_prior(), prior.gamma_prior())
    assert json.loads(path.read_text())["counts"] == [5, 0, 2]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prior.save(path)
    OutlierPrior(counts=[1, 1, 1], gamma=1.0, class_names=["a", "b", "c"]).save(path, overwrite=True)
    assert OutlierPrior.load(path).counts == [1, 1, 1]
    assert [p.name for p in path.parent.iterdir()] == ["prior.json"]  # no temporary files left


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"counts": [1, -2], "gamma": 1.0}', "non-negative"),
    ('{"counts": [1, 2], "gamma": 1.0, "class_names": ["a"]}', "2 counts but 1 class names"),
    ('{"counts": "12", "gamma": 1.0}', "list of integers"),
    ('{"counts": [1.5, 2], "gamma": 1.0}', "list of integers"),
    ('{"counts": [1, 2], "gamma": "high"}', "'gamma' must be a number"),
    ('{"counts": [0, 0]}', "all outlier counts are zero"),
    ('[1, 2]', "JSON object"),
])
def test_load_corrupt_file_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "prior.json"
    path.write_text(content)
    with pytest.raises(PriorError, match=match) as info:
        OutlierPrior.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="estimate-prior"):
        OutlierPrior.load(tmp_path / "nope.json")
