"""Probes of a clumsy user (and of bad luck): resuming a run with other settings or data, two writers in one
folder, leftovers of killed processes, a full disk, missing devices, diverging runs, read-only folders, renamed
class folders, outputs that exist, permissions of what we write. Each must end in a clear error (no traceback)
before work is wasted, and nothing may be silently reused, mixed or overwritten."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import oodtune.pipeline as pipe
import oodtune.pipeline.classification as classification
import oodtune.utils.atomic as atomic
from fixtures_data import make_tar, offline_env, write_image, write_labelled_folder
from helpers_cli import FAST, fails, ok
from helpers_lock import lock_held_elsewhere
from helpers_training import checkpoint_meta, random_imageset, tiny_net
from oodtune.cli import cli_message
from oodtune.data import load_dataset
from oodtune.data.images import _exit_with_parent
from oodtune.errors import (
    ConfigError,
    DataError,
    DeviceUnavailableError,
    OutputInUseError,
    ResumeMismatchError,
    StorageError,
)
from oodtune.models import META_VERSION, RunMeta, read_checkpoint, read_meta, save_checkpoint
from oodtune.training.config import TrainConfig
from oodtune.training.trainer import LAST, Trainer, check_run_dir
from oodtune.utils.atomic import remove_stale_temporaries, temporary_path, write_atomic, write_text_atomic
from oodtune.utils.lock import LOCK_NAME, output_lock
from oodtune.utils.runtime import resolve_device

ARCH = "wrn-10-1"


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"epochs": 2, "batch_size": 8, "outlier_batch_size": 8, "max_steps_per_epoch": 1,
                            "lr": 0.01, "device": "cpu", "precision": "fp32"}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env(tmp_path_factory.mktemp("robust"), train_per_class=10, test_per_class=4) as e:
        yield e


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Path]) -> Path:
    return pipe.pretrain(env["tmp"] / "pre", arch=ARCH, data_root=env["root"], config=cfg(epochs=1))


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Two labelled image folders A and B (same classes, different pictures) and an isolated cache."""
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")
    a = write_labelled_folder(tmp_path / "data" / "A", ["cat", "dog"], per_class=4)
    b = write_labelled_folder(tmp_path / "data" / "B", ["cat", "dog"], per_class=4)
    write_image(b / "cat" / "img0.png", (32, 32), seed=77)
    return {"A": a, "B": b, "root": tmp_path / "data", "tmp": tmp_path}


def _killed_after_first_epoch(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    """Run ``run()`` with the process 'killed' right after the epoch-1 checkpoint (last.pt) is written."""
    class Killed(Exception):
        pass

    real = Trainer._save_state

    def save_then_die(self: Trainer, epoch: int, *args: Any, **kwargs: Any) -> None:
        real(self, epoch, *args, **kwargs)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_state", save_then_die)
        with pytest.raises(Killed):
            run()


# ------------------------------------------------------------ 7. resume checks every setting that defines a run

def _pretrain(folders: dict[str, Path], out: Path, dataset: str = "folder:A", arch: str = ARCH, **kw: Any) -> Path:
    return pipe.pretrain(out, dataset=dataset, arch=arch, data_root=folders["root"], config=cfg(**kw))


@pytest.mark.parametrize(("change", "match"), [
    ({"dataset": "folder:B"}, "dataset: 'folder:/.*' -> 'folder:/.*dataset_fingerprint"),
    ({"seed": 1}, "train.seed: 0 -> 1"),
    ({"arch": "wrn-16-1"}, "arch: 'wrn-10-1' -> 'wrn-16-1'"),
])
def test_pretraining_resumes_only_with_the_same_settings(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                         change: dict[str, Any], match: str) -> None:
    out = folders["tmp"] / "run"
    _killed_after_first_epoch(monkeypatch, lambda: _pretrain(folders, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {LAST, "history.csv"}
    with pytest.raises(ResumeMismatchError, match=match):
        _pretrain(folders, out, **change)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed into the unfinished run
    _pretrain(folders, out)  # the same settings resume and finish
    assert read_meta(out / "model.pt").dataset_fingerprint is not None


def test_pretraining_does_not_resume_on_changed_data(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Same dataset name, other content (an image replaced between the kill and the restart): refused."""
    out = folders["tmp"] / "run"
    _killed_after_first_epoch(monkeypatch, lambda: _pretrain(folders, out))
    write_image(folders["A"] / "dog" / "img0.png", (32, 32), seed=1234)
    with pytest.raises(ResumeMismatchError, match="dataset_fingerprint"):
        _pretrain(folders, out)


@pytest.fixture
def two_bases(folders: dict[str, Path]) -> tuple[Path, Path]:
    return (_pretrain(folders, folders["tmp"] / "p1", epochs=1),
            _pretrain(folders, folders["tmp"] / "p2", epochs=1, seed=5))


def _finetune(folders: dict[str, Path], base: Path, out: Path, method: str = "energy-oe",
              **options: float) -> Path:
    return pipe.finetune(base, out, method=method, data_root=folders["root"], outliers="gaussian", config=cfg(),
                         loss_options=options)


@pytest.mark.e2e
@pytest.mark.parametrize("change", ["method", "base", "base_content", "loss_option"])
def test_finetuning_resumes_only_with_the_same_method_base_and_options(
        folders: dict[str, Path], two_bases: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    p1, p2 = two_bases
    out = folders["tmp"] / "ft"
    _killed_after_first_epoch(monkeypatch, lambda: _finetune(folders, p1, out))
    kwargs: dict[str, Any] = {"method": {"method": "oe"}, "base": {"base": p2}, "base_content": {},
                              "loss_option": {"m_in": -30.0}}[change]
    match = {"method": "method: 'energy-oe' -> 'oe'", "base": "pretrained: ", "base_content": "pretrained_sha256",
             "loss_option": "loss_options"}[change]
    if change == "base_content":  # the same path now holds other weights
        p1.write_bytes(p2.read_bytes())
    with pytest.raises(ResumeMismatchError, match=match):
        _finetune(folders, kwargs.pop("base", p1), out, **kwargs)
    stored = read_checkpoint(out / LAST)["meta"]
    assert stored.method == "energy-oe" and stored.pretrained == str(p1)  # the metadata was not rewritten


def test_meta_version_3_and_migration(tmp_path: Path) -> None:
    meta = checkpoint_meta(random_imageset(4))
    assert META_VERSION == 3 and meta.version == 3
    old = {k: v for k, v in meta.to_dict().items()
           if k not in ("dataset_fingerprint", "outliers_fingerprint", "pretrained_sha256")}
    migrated = RunMeta.from_dict({**old, "version": 2})
    assert migrated == meta and migrated.dataset_fingerprint is None and migrated.pretrained_sha256 is None


def test_fingerprint_is_the_content() -> None:
    a, b = random_imageset(16, seed=0), random_imageset(16, seed=0, name="other name")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != random_imageset(16, seed=1).fingerprint()
    assert a.fingerprint() != a.subset(list(range(15, -1, -1))).fingerprint()  # order matters


# ------------------------------------------------------------------------ 9. one writer per output folder

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"PID {os.getpid()} on test-host (holder)".encode())
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """An output folder whose lock another (live) process holds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_and_a_dead_holder_does_not_block(held: tuple[Path, subprocess.Popen]) -> None:
    folder, proc = held
    with pytest.raises(OutputInUseError, match=f"{folder} is in use by PID {proc.pid} on test-host"), \
            output_lock(folder):
        pass
    proc.kill()  # kill -9: no clean-up; the lock file stays behind
    proc.wait()
    assert (folder / LOCK_NAME).exists()
    with output_lock(folder):  # the kernel released the dead holder's lock
        assert str(os.getpid()) in (folder / LOCK_NAME).read_text()
        with output_lock(folder):  # re-entrant within a process
            pass
    assert not (folder / LOCK_NAME).exists()


def test_shared_holders_coexist_and_keep_out_an_exclusive_writer(tmp_path: Path) -> None:
    folder = tmp_path / "grid"
    with lock_held_elsewhere(folder, shared=True):
        with output_lock(folder, shared=True):  # a second --only process
            pass
        assert (folder / LOCK_NAME).exists()  # a shared holder leaves the file to the others
        with pytest.raises(OutputInUseError, match="or --seed seeds may share"), output_lock(folder):
            pass
    with output_lock(folder):  # every shared holder gone
        pass


def test_a_shared_writer_is_refused_while_an_exclusive_one_holds(held: tuple[Path, subprocess.Popen]) -> None:
    folder, proc = held
    with pytest.raises(OutputInUseError, match=f"in use by PID {proc.pid}"), output_lock(folder, shared=True):
        pass


@pytest.mark.e2e
def test_pretrain_and_finetune_into_a_busy_folder(env: dict[str, Path], pretrained: Path,
                                                  held: tuple[Path, subprocess.Popen],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder, proc = held
    monkeypatch.setattr(classification, "pretrain_setup", _must_not_run)
    with pytest.raises(OutputInUseError):
        pipe.pretrain(folder, arch=ARCH, data_root=env["root"], config=cfg())
    fails("pretrain", "--arch", ARCH, "--data-root", env["root"], "--out", folder, *FAST,
          match=f"in use by PID {proc.pid}", code=1)
    fails("finetune", pretrained, "--method", "oe", "--data-root", env["root"], "--out", folder, *FAST,
          match=f"in use by PID {proc.pid}", code=1)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def test_lock_is_taken_by_rank_zero_only_and_failed_commands_leave_no_folder(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with output_lock(tmp_path / "new") as folder:
        assert (folder / LOCK_NAME).exists()
    assert not (tmp_path / "new").exists()  # created by the lock, left empty: removed again
    monkeypatch.setenv("RANK", "1")
    with output_lock(tmp_path / "rank1"):
        assert not (tmp_path / "rank1").exists()


def _must_not_run(*_a: Any, **_k: Any) -> None:
    raise AssertionError("work started although the output was unusable")


# --------------------------------------------------------------------- 10. leftovers of killed processes

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    host = atomic._HOST
    dead = tmp_path / f".last.pt.tmp-{host}-{_dead_pid()}-0a1b2c3d"
    alive = tmp_path / f".last.pt.tmp-{host}-{os.getppid()}-0a1b2c3d"
    other_host = tmp_path / f".last.pt.tmp-elsewhere{host}-{_dead_pid()}-0a1b2c3d"
    dead_dir = tmp_path / f".cifar-extracted.tmp-{host}-{_dead_pid()}-00ff"
    for p in (dead, alive, other_host):
        p.write_bytes(b"x" * 1000)
    dead_dir.mkdir()
    (dead_dir / "half.png").write_bytes(b"x")
    write_text_atomic(tmp_path / "results.md", "hello\n")  # any later write into the folder cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other_host.name, "results.md"])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_the_next_run_removes_leftovers_even_when_it_writes_nothing(folders: dict[str, Path]) -> None:
    """A cache hit and the start of a run clean what killed processes left (465 MB in one probe)."""
    load_dataset("folder:A", folders["root"], "train")
    stale = folders["tmp"] / "cache" / "images" / f".folder-A-train.npz.tmp-{atomic._HOST}-{_dead_pid()}-0a1b"
    stale.write_bytes(b"x" * 1000)
    load_dataset("folder:A", folders["root"], "train")  # served from the cache
    assert not stale.exists()
    run = folders["tmp"] / "run"
    run.mkdir()
    (run / f".last.pt.tmp-{atomic._HOST}-{_dead_pid()}-0a1b").write_bytes(b"x")
    check_run_dir(run)
    assert list(run.iterdir()) == []


def test_temporaries_carry_host_and_pid(tmp_path: Path) -> None:
    seen: list[str] = []

    def write(fh: Any) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        fh.write(b"data")

    write_atomic(tmp_path / "model.pt", write)
    assert len(seen) == 1 and seen[0].startswith(f".model.pt.tmp-{atomic._HOST}-{os.getpid()}-")
    assert temporary_path(tmp_path / "x").name.startswith(f".x.tmp-{atomic._HOST}-{os.getpid()}-")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _orphan_worker() -> None:
    _exit_with_parent(-1)  # a parent pid this process does not have: as if the parent had died
    time.sleep(30)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_decoding_workers_exit_when_their_parent_is_gone() -> None:
    proc = multiprocessing.get_context("fork").Process(target=_orphan_worker)
    proc.start()
    proc.join(10)
    assert proc.exitcode == 1, "the worker outlived its parent"


# ------------------------------------------------------------------------------------ 11. disk full

def _torch_like_failure(code: int) -> Any:
    """A write that fails as torch.save does on a full disk: a RuntimeError raised while handling the OSError."""
    def write(fh: Any) -> None:
        fh.write(b"half a checkpoint")
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    return write


@pytest.mark.parametrize(("code", "match"), [(errno.ENOSPC, "no space left on the device"),
                                             (errno.EDQUOT, "disk quota exceeded"),
                                             (errno.EFBIG, "the file is larger than this system allows")])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(tmp_path: Path, code: int, match: str) -> None:
    path = write_text_atomic(tmp_path / "last.pt", "previous")
    with pytest.raises(StorageError, match=f"cannot write {path}: {match}.*previous file.*unchanged"):
        write_atomic(path, _torch_like_failure(code))
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_during_pretraining_from_the_command_line(env: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj: Any, fh: Any, *_a: Any, **_k: Any) -> None:
        _torch_like_failure(errno.ENOSPC)(fh)

    monkeypatch.setattr("oodtune.models.checkpoint.torch.save", full)
    fails("pretrain", "--arch", ARCH, "--data-root", env["root"], "--out", env["tmp"] / "full", *FAST,
          match="no space left on the device", code=1)


# ------------------------------------------------------------------- 12. clean errors instead of tracebacks

def test_devices(env: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="unknown device 'meta'"):
        resolve_device("meta")
    assert resolve_device("cpu") == torch.device("cpu")
    for device, match in [("gpu", "unknown device 'gpu'"), ("cuda:99", "cuda")]:
        fails("pretrain", "--device", device, "--out", env["tmp"] / "dev", match=match, code=2)
        fails("benchmark", "nonexistent.toml", "--device", device, match=match, code=2)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            resolve_device("cuda")
        fails("evaluate", "x.pt", "--ood", "gaussian", "--device", "cuda", match="CUDA is not available", code=2)
    assert not (env["tmp"] / "dev").exists()


@pytest.mark.e2e
def test_a_diverging_run_and_a_diverged_checkpoint(env: dict[str, Path], pretrained: Path, tmp_path: Path) -> None:
    fails("pretrain", "--arch", ARCH, "--data-root", env["root"], "--out", tmp_path / "div", "--epochs", "1",
          "--batch-size", "8", "--max-steps-per-epoch", "3", "--lr", "1e12", "--device", "cpu",
          match="non-finite loss", code=1)  # lr 1e6 too, after ~20 steps
    ck = torch.load(pretrained, weights_only=True)
    ck["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, tmp_path / "nan.pt")
    common = ["--data-root", env["root"], "--device", "cpu"]
    fails("evaluate", tmp_path / "nan.pt", "--ood", "gaussian", *common, match="NaN/inf logits", code=1)
    fails("propose-margins", tmp_path / "nan.pt", *common, match="NaN/inf logits", code=1)
    fails("estimate-prior", tmp_path / "nan.pt", "--out", tmp_path / "p.json", *common, match="NaN/inf", code=1)


@pytest.fixture
def unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder nothing can be created in: permissions for a normal user; for root (who ignores them) the calls
    that create files and folders under it fail as on a read-only mount. (tests/test_slow_probes.py uses a real
    read-only mount.)"""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    inside = folder.resolve()

    def guard(fn: Any) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(os.fsdecode(path)).resolve().is_relative_to(inside):
                raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
            return fn(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", guard(os.open))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir))
    yield folder


def test_read_only_outputs_are_refused_before_any_work(env: dict[str, Path], pretrained: Path, unwritable: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for step in ("evaluate_checkpoint", "estimate_prior", "pretrain", "finetune"):
        monkeypatch.setattr(pipe, step, _must_not_run)
    monkeypatch.setattr(classification, "pretrain_setup", _must_not_run)
    common = ["--data-root", env["root"], "--device", "cpu"]
    fails("evaluate", pretrained, "--ood", "gaussian", "--out", unwritable / "table", *common,
          match="cannot write", code=1)
    fails("estimate-prior", pretrained, "--out", unwritable / "prior.json", *common, match="cannot write", code=1)
    with pytest.raises(StorageError, match="cannot write"):
        classification.pretrain(unwritable / "run", arch=ARCH, data_root=env["root"], config=cfg())
    fails("import-model", pretrained, "--arch", ARCH, "--out", unwritable / "mine.pt", *common,
          match="cannot write", code=1)


def test_read_only_or_misplaced_cache(env: dict[str, Path], unwritable: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pics = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=2)
    archive = make_tar(pics, tmp_path / "pics.tar.gz")
    monkeypatch.setenv("OODTUNE_CACHE", str(unwritable))
    with pytest.raises(StorageError, match="OODTUNE_CACHE"):  # an archive must be extracted into the cache
        load_dataset(f"folder:{archive}", tmp_path)
    with pytest.warns(UserWarning, match="could not write the data cache"):  # a folder only loses its cache
        assert len(load_dataset(f"folder:{pics}", tmp_path)) == 4
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp_path / "a-file" / "sub"))
    with pytest.raises(DataError, match="a-file is a file"):
        load_dataset(f"folder:{pics}", tmp_path)
    fails("evaluate", "x.pt", "--ood", "gaussian", match="does not exist", code=2)


def test_config_files_with_non_tables_and_unknown_keys(env: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("pretrain = 3\n")
    fails("pretrain", "--config", bad, match="[pretrain] must be a table", code=2)
    bad.write_text("epochz = 2\n")  # a misspelled epochs would silently train the default 100
    fails("pretrain", "--config", bad, "--out", tmp_path / "o", match="epochz are options of no oodtune command",
          code=2)
    good = tmp_path / "good.toml"
    good.write_text(f'ood = ["gaussian"]\narch = "{ARCH}"\nepochs = 1\n')  # keys of other commands are fine
    ok("pretrain", "--config", good, "--data-root", env["root"], "--out", tmp_path / "o", *FAST)


def _renamed_class_run(tmp_path: Path) -> tuple[Path, Path]:
    """A model pretrained on folder:PICS (classes a, b, c), then class folder 'b' renamed to 'bee'."""
    pics = write_labelled_folder(tmp_path / "data" / "pics", ["a", "b", "c"], per_class=3)
    model = pipe.pretrain(tmp_path / "pre", dataset="folder:pics", arch=ARCH, data_root=tmp_path / "data",
                          config=cfg(epochs=1))
    (pics / "b").rename(pics / "bee")
    return model, tmp_path / "data"


@pytest.mark.e2e
def test_renamed_or_added_class_folders_are_refused_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    monkeypatch.setenv("OODTUNE_CACHE", str(tmp_path / "cache"))
    model, root = _renamed_class_run(tmp_path)
    common = ["--data-root", root, "--device", "cpu"]
    match = "class 1 is 'b' in the checkpoint but 'bee' in the data"
    fails("evaluate", model, "--ood", "gaussian", *common, match=match, code=1)
    fails("propose-margins", model, "--outliers", "gaussian", *common, match=match, code=1)
    fails("finetune", model, "--method", "oe", "--outliers", "gaussian", "--out", tmp_path / "ft", *FAST, *common,
          match=match, code=1)
    with pytest.raises(DataError, match=match):
        pipe.id_test_accuracy(model, data_root=root, device="cpu")
    write_labelled_folder(root / "pics", ["d"], per_class=1)
    fails("evaluate", model, "--ood", "gaussian", *common, match="the checkpoint has 3 classes, the data 4", code=1)
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------------------ 13. outputs checked before work

def test_existing_outputs_are_refused_before_work(env: dict[str, Path], pretrained: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["--data-root", env["root"], "--device", "cpu"]
    prior = tmp_path / "prior.json"
    prior.write_text("{}")
    with monkeypatch.context() as m:
        m.setattr(pipe, "estimate_prior", _must_not_run)
        m.setattr(classification, "pretrain_setup", _must_not_run)
        m.setattr(classification.ClassificationTask, "train", _must_not_run)
        res = fails("estimate-prior", pretrained, "--out", prior, *common, match="pass --overwrite", code=1)
        assert "overwrite=True" not in res.output
        with pytest.raises(FileExistsError, match="finished"):
            classification.pretrain(pretrained.parent, arch=ARCH, data_root=env["root"], config=cfg())
        fails("finetune", pretrained, "--method", "oe", "--out", pretrained.parent, *common, *FAST,
              match="this run is finished", code=1)
        fails("import-model", pretrained, "--arch", ARCH, "--out", prior, *common, match="already exists", code=1)
    ok("estimate-prior", pretrained, "--out", prior, "--overwrite", *common)
    assert json.loads(prior.read_text())["counts"]
    assert cli_message("pass overwrite=True to replace it") == "pass --overwrite to replace it"


@pytest.mark.parametrize(("option", "value"), [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"),
                                               ("--lr", "-1")])
def test_non_finite_training_options_are_rejected_at_parsing(env: dict[str, Path], option: str, value: str) -> None:
    fails("pretrain", option, value, "--out", env["tmp"] / "nf", match=option, code=2)
    fails("finetune", "x.pt", "--method", "oe", "--out", env["tmp"] / "nf", option, value, match=option, code=2)
    assert not (env["tmp"] / "nf").exists()


def test_train_config_rejects_non_finite_values() -> None:
    for field in ("lr", "weight_decay", "momentum"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=field):
                TrainConfig(**{field: bad})


# ----------------------------------------------------------------------------------------- 14. umask

@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        text = write_text_atomic(tmp_path / "results.md", "x")
        ckpt = save_checkpoint(tmp_path / "run" / "model.pt", tiny_net(), checkpoint_meta(random_imageset(4)))
    finally:
        os.umask(old)
    assert (text.stat().st_mode & 0o777, ckpt.stat().st_mode & 0o777) == (mode, mode)


def test_lock_labels_name_this_host() -> None:
    from oodtune.utils.lock import _holder_label

    assert f"PID {os.getpid()} on {socket.gethostname()}" in _holder_label()
