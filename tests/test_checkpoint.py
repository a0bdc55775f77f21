"""Atomic, weights_only checkpoints: roundtrip, atomicity, clear errors and model rebuilding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import oodtune.models.checkpoint as ckpt_mod
from helpers_training import TINY_ARCH, assert_states_equal, checkpoint_meta, random_imageset, state_of, tiny_net
from oodtune.models import META_VERSION, RunMeta, build_model
from oodtune.models.checkpoint import CheckpointError, load_model, read_checkpoint, save_atomic, save_checkpoint

META = checkpoint_meta(random_imageset(4))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_roundtrip_with_train_state(tmp_path: Path) -> None:
    net = tiny_net(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 16, 16))[0].sum().backward()
    opt.step()
    train_state = {"epoch": 1, "optimizer": opt.state_dict(), "generator": torch.Generator().get_state(),
                   "history": [{"epoch": 1, "loss": 0.5}], "config": {"lr": 0.1, "compile": "none", "device": None}}
    path = save_checkpoint(tmp_path / "sub" / "last.pt", net, META, train_state=train_state)
    assert path == tmp_path / "sub" / "last.pt"
    raw = torch.load(path, weights_only=True)  # must not need pickled classes
    assert raw["format"] == ckpt_mod.FORMAT_VERSION
    ck = read_checkpoint(path)
    assert ck["meta"] == META
    assert ck["train_state"]["history"] == train_state["history"]
    assert ck["train_state"]["config"] == train_state["config"]
    assert_states_equal(ck["model"], state_of(net.model))
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck["train_state"]["optimizer"])
    momentum = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2)]
    assert torch.equal(*momentum)
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("wrap", ["feature_model", "plain", "data_parallel"])
def test_load_model_rebuilds_the_architecture(tmp_path: Path, wrap: str) -> None:
    """Whatever wrapper is saved, load_model rebuilds build_model(arch) with identical outputs."""
    net = tiny_net(1)
    saved: nn.Module = {"feature_model": net, "plain": net.model, "data_parallel": nn.DataParallel(net)}[wrap]
    path = save_checkpoint(tmp_path / "model.pt", saved, META)
    model, meta = load_model(path)
    assert type(model) is type(build_model(TINY_ARCH, META.num_classes))
    assert meta == META and not model.training
    assert_states_equal(state_of(model), state_of(net.model))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.model.eval()(x), rtol=0, atol=0)


def test_save_checkpoint_requires_complete_meta(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="lacks.*resolution"):
        RunMeta.from_dict({k: v for k, v in META.to_dict().items() if k != "resolution"})
    with pytest.raises(TypeError, match="RunMeta"):
        save_checkpoint(tmp_path / "m.pt", tiny_net(), META.to_dict())  # type: ignore[arg-type]
    assert not (tmp_path / "m.pt").exists()


def test_meta_roundtrip_and_migration_of_old_layouts(tmp_path: Path) -> None:
    assert RunMeta.from_dict(META.to_dict()) == META
    # version-1 dicts (no version, no drop_rate/task; the reference loop's top-level "loop") still load
    old = {k: v for k, v in META.to_dict().items() if k not in ("version", "drop_rate", "task", "notes")}
    migrated = RunMeta.from_dict({**old, "loop": "reference-style"})
    assert migrated.drop_rate == 0.3 and migrated.task == "classification" and migrated.version == META_VERSION
    assert migrated.notes == {"loop": "reference-style"}
    ck = {"format": 1, "model": state_of(tiny_net().model), "meta": old, "train_state": None}
    torch.save(ck, tmp_path / "old.pt")
    model, meta = load_model(tmp_path / "old.pt")
    assert meta.replace(notes={}) == META
    with pytest.raises(CheckpointError, match="unknown keys"):
        RunMeta.from_dict({**META.to_dict(), "spilt": "test"})
    with pytest.raises(CheckpointError, match="newer"):
        RunMeta.from_dict({**META.to_dict(), "version": META_VERSION + 1})
    with pytest.raises(CheckpointError, match="class names"):
        META.replace(num_classes=5)


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "last.pt", tiny_net(0), META)
    before = path.read_bytes()

    def broken_save(obj: object, fh: object, *args: object, **kwargs: object) -> None:
        fh.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny_net(1), META)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert_states_equal(read_checkpoint(path)["model"], state_of(tiny_net(0).model))


def test_interrupt_during_save_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a KeyboardInterrupt (BaseException) mid-write leaves no temporary file and no target."""
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": 1}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_atomic({"v": torch.tensor(1)}, path)
    save_atomic({"v": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path)  # a folder is not a checkpoint either


def test_corrupt_file(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", tiny_net(), META)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated zip
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(bad)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(tmp_path / "text.pt")


def test_foreign_torch_files(tmp_path: Path) -> None:
    """A bare state_dict / other dicts saved with torch.save are recognised as not oodtune checkpoints."""
    torch.save(tiny_net().model.state_dict(), tmp_path / "state_dict.pt")
    torch.save({"format": 99, "model": {}}, tmp_path / "future.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name in ("state_dict.pt", "future.pt", "list.pt"):
        with pytest.raises(CheckpointError, match="not an oodtune checkpoint"):
            read_checkpoint(tmp_path / name)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint holding an arbitrary Python object cannot be loaded."""
    torch.save({"format": 1, "model": {}, "meta": {}, "train_state": None, "evil": object()}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "obj.pt")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", tiny_net(), META.replace(num_classes=7, classes=tuple("abcdefg")))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
