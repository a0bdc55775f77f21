"""Optional: the team's offline mirror loads with the published counts (skipped where it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oodtune.data import load_dataset

MIRROR = Path("/work/shared/data")
pytestmark = pytest.mark.skipif(not (MIRROR / "mnist").is_dir(), reason="offline mirror not present")


def test_mirror_mnist_and_dtd(tmp_path, monkeypatch):
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")
    mnist = load_dataset("mnist", MIRROR, cache_dir=tmp_path)
    assert len(mnist) == 10_000 and mnist.class_counts().sum() == 10_000 and mnist.images.shape[1:] == (32, 32, 3)
    dtd = load_dataset("dtd", MIRROR, cache_dir=tmp_path)
    assert len(dtd) == 1_200 and dtd.num_classes == 10 and dtd.class_counts().tolist() == [120] * 10
