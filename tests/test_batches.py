"""Batched augmentation and normalisation (oodtune.data.tensors) and index sampling (oodtune.training.sampling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers_training import random_imageset
from oodtune.data.tensors import CIFAR_MEAN, CIFAR_STD, Normalizer, random_crop_flip, to_device_uint8
from oodtune.training.sampling import OutlierSampler, index_batches

PAD = 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_uint8(b: int = 16, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), generator=_gen(seed), dtype=torch.uint8)


def _all_windows(img: torch.Tensor, padding: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Reference: every (dy, dx, flip) crop of the zero-padded (C, H, W) image, computed one at a time."""
    _, h, w = img.shape
    padded = F.pad(img, (padding,) * 4)
    out = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = window
            out[(dy, dx, True)] = window.flip(-1)
    return out


def _matching_windows(img: torch.Tensor, aug: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    return [key for key, win in _all_windows(img, padding).items() if torch.equal(win, aug)]


def test_crop_flip_is_reproducible_with_a_seeded_generator() -> None:
    x = _random_uint8(32)
    a = random_crop_flip(x, _gen(7))
    b = random_crop_flip(x, _gen(7))
    c = random_crop_flip(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == x.dtype and a.shape == x.shape


def test_crop_flip_output_is_a_window_of_the_padded_input() -> None:
    """Brute force: each output sample equals exactly one shifted (and maybe flipped) window of its input."""
    x = _random_uint8(64, h=8, w=6, seed=1)  # non-square, to catch row/col mix-ups
    aug = random_crop_flip(x, _gen(3), padding=PAD)
    keys = []
    for img, out in zip(x, aug, strict=False):
        matches = _matching_windows(img, out, PAD)
        assert len(matches) == 1, f"augmented sample matches {len(matches)} reference windows"
        keys.append(matches[0])
    # per-sample randomness: many different offsets and both flip states occur in one batch
    assert len({k[:2] for k in keys}) > 20
    assert {k[2] for k in keys} == {False, True}


def test_crop_flip_covers_every_offset_and_flip() -> None:
    """Over a large batch every one of the (2p+1)^2 offsets x 2 flips is drawn (identity rows = offsets)."""
    b, h = 4000, 12
    # image whose pixel value encodes (row, col) so the window position can be read off the output directly
    rows = torch.arange(h).view(h, 1) + 1
    cols = torch.arange(h).view(1, h) + 1
    coded = torch.stack([rows.expand(h, h), cols.expand(h, h), torch.zeros(h, h, dtype=torch.long)])
    x = coded.to(torch.uint8).expand(b, 3, h, h).contiguous()
    aug = random_crop_flip(x, _gen(0), padding=2)
    centre_row = aug[:, 0, h // 2, h // 2].long() - 1 - h // 2   # dy - padding
    centre_col = aug[:, 1, h // 2, :].long()
    flipped = centre_col[:, 0] > centre_col[:, -1]
    seen = set(zip(centre_row.tolist(), flipped.tolist(), strict=False))
    assert {r for r, _ in seen} == set(range(-2, 3))
    assert len(seen) == 10
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_crop_flip_without_padding_only_flips() -> None:
    x = _random_uint8(16)
    aug = random_crop_flip(x, _gen(0), padding=0)
    for img, out in zip(x, aug, strict=False):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))


def test_to_device_uint8_is_nchw() -> None:
    ds = random_imageset(5, size=6)
    t = to_device_uint8(ds, "cpu")
    assert t.dtype == torch.uint8 and t.shape == (5, 3, 6, 6) and t.is_contiguous()
    assert torch.equal(t.permute(0, 2, 3, 1), torch.from_numpy(ds.images))


def test_normalizer_math() -> None:
    x = _random_uint8(4)
    out = Normalizer()(x)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    expected = (x.double() / 255 - mean.double()) / std.double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    # a pixel equal to the mean maps to 0, mean + std maps to 1
    norm = Normalizer((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    probe = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(probe).flatten(), torch.tensor([1.0, -1.0, 0.0]))


def test_normalizer_channels_last() -> None:
    out = Normalizer(channels_last=True)(_random_uint8(2))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, Normalizer()(_random_uint8(2)))


@pytest.mark.parametrize(("mean", "std"), [((0.5, 0.5), (0.2, 0.2, 0.2)), ((0.5,) * 3, (0.2, 0.0, 0.2))])
def test_normalizer_rejects_bad_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="std > 0"):
        Normalizer(mean, std)


@pytest.mark.parametrize(("n", "bs", "drop_last", "n_batches", "n_seen"),
                         [(103, 10, True, 10, 100), (103, 10, False, 11, 103), (100, 10, True, 10, 100),
                          (7, 10, True, 1, 7)])
def test_index_batches_cover_each_index_once(n: int, bs: int, drop_last: bool, n_batches: int, n_seen: int) -> None:
    batches = list(index_batches(n, bs, _gen(0), drop_last=drop_last))
    assert len(batches) == n_batches
    flat = torch.cat(batches)
    assert len(flat) == n_seen and len(set(flat.tolist())) == n_seen, "an index repeats within an epoch"
    assert flat.min() >= 0 and flat.max() < n
    if drop_last and n >= bs:
        assert all(len(b) == bs for b in batches)


def test_index_batches_reshuffle_each_epoch() -> None:
    gen = _gen(0)
    first, second = (torch.cat(list(index_batches(50, 10, gen))) for _ in range(2))
    assert not torch.equal(first, second)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))


@pytest.mark.parametrize(("world", "bs"), [(2, 16), (3, 12), (4, 16)])
def test_rank_slices_partition_the_global_batch(world: int, bs: int) -> None:
    """Ranks with same-seeded generators get disjoint slices whose union is the single-process batch."""
    glob = list(index_batches(100, bs, _gen(5)))
    per_rank = [list(index_batches(100, bs, _gen(5), rank=r, world=world)) for r in range(world)]
    for step, batch in enumerate(glob):
        slices = [set(per_rank[r][step].tolist()) for r in range(world)]
        assert sum(len(s) for s in slices) == len(batch)
        assert set().union(*slices) == set(batch.tolist())
        assert all(len(slices[r] & slices[q]) == 0 for r in range(world) for q in range(r))


def test_index_batches_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        next(index_batches(0, 4, _gen()))


def test_outlier_sampler_uses_whole_set_before_repeating() -> None:
    n, bs = 64, 16
    sampler = OutlierSampler(n, bs, _gen(1))
    for _ in range(3):  # three passes over the set
        seen = torch.cat([sampler.next() for _ in range(n // bs)]).tolist()
        assert sorted(seen) == list(range(n))


def test_outlier_sampler_no_repeat_within_a_pass_when_n_not_divisible() -> None:
    n, bs = 50, 16
    sampler = OutlierSampler(n, bs, _gen(2))
    draws = [sampler.next() for _ in range(9)]  # 3 passes of 3 full batches (2 leftovers dropped per pass)
    assert all(len(d) == bs for d in draws)
    for p in range(3):
        chunk = torch.cat(draws[3 * p : 3 * p + 3]).tolist()
        assert len(set(chunk)) == len(chunk) == 48


def test_outlier_sampler_rank_slices() -> None:
    world, bs = 2, 16
    single = OutlierSampler(64, bs, _gen(3))
    ranks = [OutlierSampler(64, bs, _gen(3), rank=r, world=world) for r in range(world)]
    for _ in range(6):
        batch = single.next()
        parts = [s.next() for s in ranks]
        assert all(len(p) == bs // world for p in parts)
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(batch).values)


def test_outlier_sampler_needs_one_batch() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        OutlierSampler(10, 16, _gen())


def test_index_batches_is_a_chunked_randperm() -> None:
    """A fixed seed gives torch.randperm's order, chunked (the last partial chunk dropped)."""
    perm = torch.randperm(30, generator=_gen(11))
    got = torch.cat(list(index_batches(30, 8, _gen(11))))
    assert torch.equal(got, perm[:24])
