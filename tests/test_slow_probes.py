"""Probes that need real processes, signals and file systems: ``kill -9`` and resume, two writers at once, a full
disk, a read-only mount, decoding workers of a killed parent, and the ``python -m`` form in a folder holding a
malicious module. Each runs the command line in a subprocess, as a user would.

Marked ``slow`` (a few minutes in all on two cores): ``pytest`` skips them, ``pytest -m slow`` runs them and
``scripts/test.sh`` (CI) runs both sets.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import offline_env
from helpers_training import assert_states_equal
from oodtune.utils.lock import LOCK_NAME

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARCH = "wrn-10-1"
#: 400 ID training images, 8 per step: ~50 steps per epoch, long enough to kill a run between two epochs.
TRAIN = ["--batch-size", "8", "--device", "cpu", "--seed", "3"]
PRETRAIN = ["pretrain", "--arch", ARCH, *TRAIN]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env(tmp_path_factory.mktemp("slow"), train_per_class=40, test_per_class=4) as e:
        yield e


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OODTUNE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


def start(*args: Any, cwd: Path | None = None, **popen: Any) -> subprocess.Popen:
    """``python -m oodtune.cli ARGS`` in the background (stdout and stderr together)."""
    return subprocess.Popen([sys.executable, "-m", "oodtune.cli", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(*args: Any, cwd: Path | None = None, **popen: Any) -> tuple[int, str]:
    proc = start(*args, cwd=cwd, **popen)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()[0]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def pretrained(env: dict[str, Path]) -> Path:
    code, out = run(*PRETRAIN, "--epochs", "1", "--max-steps-per-epoch", "2", "--data-root", env["root"],
                    "--out", env["tmp"] / "pre")
    assert code == 0, out
    return env["tmp"] / "pre" / "model.pt"


# ----------------------------------------------------------------------------------- kill -9 and resume

@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_kill_9_then_resume_gives_bit_identical_weights(env: dict[str, Path], pretrained: Path, stage: str) -> None:
    common = [*TRAIN, "--epochs", "6", "--max-steps-per-epoch", "15", "--data-root", env["root"]]
    if stage == "finetune":
        common = [pretrained, "--method", "energy-oe", "--outliers", "tin-aux", "--outlier-batch-size", "8", *common]
    else:
        common = ["--arch", ARCH, *common]
    straight, killed = env["tmp"] / f"{stage}-straight", env["tmp"] / f"{stage}-killed"
    code, out = run(stage, *common, "--out", straight)
    assert code == 0, out

    proc = start(stage, *common, "--out", killed)
    wait_for(lambda: (killed / "last.pt").exists(), proc, "the first epoch's checkpoint")
    proc.send_signal(signal.SIGKILL)  # at once: five more epochs would follow
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before it could be killed"
    code, out = run(stage, *common, "--out", killed)
    assert code == 0 and "resuming" in out, out
    assert_states_equal(weights(straight / "model.pt"), weights(killed / "model.pt"))
    # no lock, no temporaries, no last.pt; the per-epoch log has every epoch once, as the uninterrupted run's
    assert sorted(p.name for p in killed.iterdir()) == ["history.csv", "model.pt"]
    epochs = [[line.split(",")[0] for line in (d / "history.csv").read_text().splitlines()] for d in (straight, killed)]
    assert epochs[0] == epochs[1]


# ------------------------------------------------------------------------------------- two writers

def _locked(out: Path) -> Callable[[], bool]:
    return lambda: "PID" in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else "")


def test_two_pretrains_into_one_folder(env: dict[str, Path]) -> None:
    out = env["tmp"] / "shared-out"
    args = [*PRETRAIN, "--epochs", "2", "--data-root", env["root"], "--out", out]
    first = start(*args)
    wait_for(_locked(out), first, "the first run's lock")
    first.send_signal(signal.SIGSTOP)  # frozen while holding the lock: no race with its finishing
    try:
        code, text = run(*args)
    finally:
        first.kill()
        first.wait()
    assert code == 1 and f"is in use by PID {first.pid}" in text and "Traceback" not in text, text


BENCH = """
[benchmark]
arch = "{arch}"
device = "cpu"
data_root = "{root}"
out = "{out}"
ood_far = ["gaussian"]
num_ood = 16
[pretrain]
epochs = 6
batch_size = 8
[[methods]]
label = "MSP"
method = "msp"
"""


def test_two_benchmarks_into_one_folder_and_a_killed_one_resumes(env: dict[str, Path]) -> None:
    out = env["tmp"] / "bench"
    config = env["tmp"] / "bench.toml"
    config.write_text(BENCH.format(arch=ARCH, root=env["root"], out=out))
    first = start("benchmark", config)
    wait_for(_locked(out), first, "the first benchmark's lock")
    first.send_signal(signal.SIGSTOP)
    try:
        code, text = run("benchmark", config)
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 1 and f"is in use by PID {first.pid}" in text, text
    wait_for(lambda: (out / "pretrain" / "last.pt").exists(), first, "the benchmark's first epoch")
    first.send_signal(signal.SIGKILL)
    first.wait()
    code, text = run("benchmark", config)  # the dead holder's lock does not block; the run resumes
    assert code == 0 and "resuming" in text, text
    assert (out / "results.md").exists() and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------ full disk, read-only mount

def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def test_a_file_size_limit_while_checkpointing(env: dict[str, Path]) -> None:
    out = env["tmp"] / "fsize"
    code, text = run(*PRETRAIN, "--arch", "wrn-16-2", "--epochs", "1", "--max-steps-per-epoch", "1",
                     "--data-root", env["root"], "--out", out, preexec_fn=_limit_file_size(1_000_000))
    assert code == 1 and "cannot write" in text and "file size limit" in text and "Traceback" not in text, text
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".")]  # no lock, no temporary


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$(mktemp -d)"'],
                           capture_output=True, check=False)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged mounts (unshare -rm)")


def in_small_mount(mount: Path, options: str, script: str) -> tuple[int, str]:
    """Run the shell ``script`` with ``$M`` a fresh tmpfs mounted on ``mount`` (``options``), inside a private
    mount namespace (so it needs no privileges and vanishes afterwards)."""
    mount.mkdir(exist_ok=True)
    cli = f"{sys.executable} -m oodtune.cli"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "$M" && {script}'],
                          env={**_env(), "M": str(mount), "CLI": cli}, capture_output=True, text=True, timeout=300,
                          check=False)
    return proc.returncode, proc.stdout + proc.stderr


@needs_mounts
def test_disk_full_keeps_the_previous_checkpoint(env: dict[str, Path]) -> None:
    """1.1 MB: room for one last.pt of WRN-10-1 (~0.65 MB) but not for its successor beside it."""
    check = ("import sys, torch; ck = torch.load(sys.argv[1], weights_only=True); "
             "print('kept epoch', ck['train_state']['epoch'])")
    code, text = in_small_mount(
        env["tmp"] / "mnt-full", "size=1100k",
        f'$CLI {" ".join(PRETRAIN)} --epochs 3 --max-steps-per-epoch 1 --data-root {env["root"]} '
        f'--out "$M/run"; echo "exit $?"; {sys.executable} -c "{check}" "$M/run/last.pt"; ls -A "$M/run"')
    assert "no space left on the device" in text and "Traceback" not in text, text
    assert "exit 1" in text and "kept epoch 1" in text, text
    assert ".tmp-" not in text.split("kept epoch 1")[1], text  # the failed write left no temporary


@needs_mounts
def test_read_only_output_folder(env: dict[str, Path], pretrained: Path) -> None:
    code, text = in_small_mount(
        env["tmp"] / "mnt-ro", "ro,size=1m",
        f'$CLI evaluate {pretrained} --ood gaussian --num-ood 8 --device cpu --data-root {env["root"]} '
        f'--out "$M/table"; echo "exit $?"; '
        f'$CLI {" ".join(PRETRAIN)} --epochs 1 --data-root {env["root"]} --out "$M/run"; echo "exit $?"')
    assert text.count("exit 1") == 2 and text.count("read-only") >= 2 and "Traceback" not in text, text
    assert "ID accuracy" not in text  # refused before evaluating


# ------------------------------------------------------------------- decoding workers of a killed parent

WORKERS = """
import sys, threading, time, multiprocessing
import oodtune.data.images as images

images._MIN_FILES_FOR_POOL, images._CHUNK = 1, 1
real = images._decode_chunk

def slow(args):
    time.sleep(120)
    return real(args)

images._decode_chunk = slow

def report():
    while len(multiprocessing.active_children()) < 2:
        time.sleep(0.05)
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)

threading.Thread(target=report, daemon=True).start()
images.decode_files(sys.argv[1:], 32, workers=2)
"""


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie has exited; only its parent's bookkeeping remains


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_decoding_workers_die_with_their_parent(env: dict[str, Path]) -> None:
    images = sorted((env["root"] / "tiny-imagenet-200" / "train").rglob("*.JPEG"))[:4]
    proc = subprocess.Popen([sys.executable, "-c", WORKERS, *map(str, images)], env=_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if not _gone(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "decoding workers outlived their killed parent"


# ---------------------------------------------------------------- python -m in a folder with evil code

def test_python_m_in_a_folder_with_a_malicious_module(env: dict[str, Path], pretrained: Path, tmp_path: Path) -> None:
    """The torchrun form ``python -m oodtune.cli`` puts the current folder first on sys.path."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    marker = tmp_path / "evil-ran"
    (folder / "evilnets.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("ran")
        def make(num_classes):
            raise SystemExit("evil")
    """))
    ck = torch.load(pretrained, weights_only=True)
    ck["meta"]["arch"] = "evilnets:make"
    torch.save(ck, folder / "model.pt")
    code, text = run("evaluate", "model.pt", "--ood", "gaussian", "--device", "cpu", "--data-root", env["root"],
                     cwd=folder)
    assert code == 1 and "--trust-arch evilnets:make" in text and "Traceback" not in text, text
    code, text = run("evaluate", "model.pt", "--ood", "gaussian", "--device", "cpu", "--data-root", env["root"],
                     "--trust-arch", "evilnets:make", cwd=folder)
    assert code == 1 and "current directory is not searched" in text, text
    assert not marker.exists()
