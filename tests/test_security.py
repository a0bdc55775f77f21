"""Probes of a hostile input: a checkpoint that names code, archive bombs and link chains, decompression and resize
amplification, a FIFO named like an image, an absurd architecture. Each must be refused with a clear error before
it can do harm."""

from __future__ import annotations

import io
import os
import signal
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import oodtune.data.archives as archives
from fixtures_data import offline_env, write_labelled_folder
from helpers_cli import FAST, fails, ok
from helpers_training import TINY_ARCH, checkpoint_meta, random_imageset, tiny_net
from oodtune.data import load_dataset
from oodtune.data.archives import ExtractLimits, extract_cached, safe_extract
from oodtune.data.images import MAX_PIXELS, array_to_resolution, decode_image
from oodtune.errors import DataError, ModelError
from oodtune.models import build_model, load_model, save_checkpoint, trusted_archs
from oodtune.models.zoo import MAX_PARAMETERS, wrn_parameters

REPO = Path(__file__).resolve().parents[1]
EVIL = "oodtune_probe_evilnets"
EVIL_CODE = f'''
    from pathlib import Path

    Path("{{marker}}").write_text("imported")  # what a malicious module would do on import


    def make(num_classes):
        from oodtune.models import build_model
        return build_model("{TINY_ARCH}", num_classes)
'''


# -------------------------------------------------------------------- 1. a checkpoint never imports code

@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    with offline_env(tmp_path_factory.mktemp("security"), train_per_class=10, test_per_class=4) as e:
        yield e


@pytest.fixture
def evil_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A downloaded folder holding ``model.pt`` whose architecture is ``oodtune_probe_evilnets:make`` and that module
    beside it; the current directory is that folder and, as under ``python -m``, first on sys.path."""
    folder = tmp_path / "downloaded"
    folder.mkdir()
    marker = tmp_path / "evil-ran"
    (folder / f"{EVIL}.py").write_text(textwrap.dedent(EVIL_CODE.format(marker=marker)))
    ds = random_imageset(8, num_classes=10, size=32)
    path = save_checkpoint(folder / "model.pt", tiny_net(num_classes=10),
                           checkpoint_meta(ds).replace(arch=f"{EVIL}:make", dataset="cifar10"))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delitem(sys.modules, EVIL, raising=False)
    yield {"ckpt": path, "marker": marker, "folder": folder}
    sys.modules.pop(EVIL, None)


def test_a_checkpoint_naming_code_is_refused_in_every_command(env: dict[str, Path],
                                                               evil_checkpoint: dict[str, Path]) -> None:
    ckpt, marker, root = evil_checkpoint["ckpt"], evil_checkpoint["marker"], env["root"]
    commands = [["evaluate", ckpt, "--ood", "gaussian"], ["estimate-prior", ckpt, "--out", env["tmp"] / "p.json"],
                ["propose-margins", ckpt], ["finetune", ckpt, "--method", "oe", "--out", env["tmp"] / "ft", *FAST]]
    for cmd in commands:
        fails(*cmd, "--data-root", root, "--device", "cpu", match=f"--trust-arch {EVIL}:make", code=1)
    with pytest.raises(ModelError, match="never runs code because a file says so"):
        load_model(ckpt)
    assert not marker.exists() and EVIL not in sys.modules
    assert not (env["tmp"] / "ft").exists() and not (env["tmp"] / "p.json").exists()


def test_trusted_code_is_still_not_imported_from_the_current_directory(env: dict[str, Path],
                                                                        evil_checkpoint: dict[str, Path]) -> None:
    ckpt, marker = evil_checkpoint["ckpt"], evil_checkpoint["marker"]
    fails("evaluate", ckpt, "--ood", "gaussian", "--data-root", env["root"], "--device", "cpu",
          "--trust-arch", f"{EVIL}:make", match="current directory is not searched", code=1)
    with pytest.raises(ModelError, match="current directory"):
        load_model(ckpt, trust_arch=[f"{EVIL}:make"])
    assert not marker.exists()


def test_trusted_code_on_pythonpath_loads(evil_checkpoint: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(evil_checkpoint["folder"]))  # the user put the folder there explicitly
    model, meta = load_model(evil_checkpoint["ckpt"], trust_arch=[f"{EVIL}:make"])
    assert meta.arch == f"{EVIL}:make" and evil_checkpoint["marker"].exists()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_trusted_archs_is_scoped() -> None:
    spec = "somepkg.nets:make"
    with trusted_archs(spec):
        with trusted_archs("other.pkg:f"):
            pass
        from oodtune.models.imported import check_trusted
        check_trusted(spec, "x")  # still trusted after the inner block
    with pytest.raises(ModelError, match="--trust-arch somepkg.nets:make"):
        check_trusted(spec, "x")
    check_trusted(TINY_ARCH, "x")  # built-in names need no trust
    with pytest.raises(ModelError, match="not an import path"), trusted_archs("not an import path"):
        pass


def test_files_cannot_name_code(env: dict[str, Path], tmp_path: Path) -> None:
    """--config files and benchmark TOMLs cannot make oodtune import code; the command line must say so."""
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[pretrain]\narch = "evilpkg.nets:make"\n')
    fails("pretrain", "--config", cfg, "--out", tmp_path / "o", match="must be given on the command line", code=2)
    cfg.write_text('[evaluate]\ntrust-arch = ["evilpkg.nets:make"]\n')
    fails("evaluate", "x.pt", "--config", cfg, match="must be given on the command line", code=2)
    bench = tmp_path / "bench.toml"
    bench.write_text(f'[benchmark]\narch = "evilpkg.nets:make"\nood_far = ["gaussian"]\nout = "{tmp_path / "b"}"\n'
                     f'data_root = "{env["root"]}"\ndevice = "cpu"\n[[methods]]\nlabel = "MSP"\nmethod = "msp"\n')
    fails("benchmark", bench, match="--trust-arch evilpkg.nets:make", code=1)
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------- 2. archive bombs

def _zip_of_zeros(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pics/a/zeros.png", bytes(size))
    return path


def test_zip_bomb_is_refused_before_writing(tmp_path: Path) -> None:
    bomb = _zip_of_zeros(tmp_path / "bomb.zip", 129 * 10**6)  # the probe: ~127 kB expanding to 129 MB
    assert bomb.stat().st_size < 200_000
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"archive bomb.*OODTUNE_MAX_EXTRACT_RATIO") as exc:
        extract_cached(bomb, cache)
    assert "times its size on disk (limit 200 times)" in str(exc.value)
    assert list((cache / "extracted").iterdir()) == []  # nothing written, no temporary left
    with pytest.raises(DataError, match="archive bomb"):
        load_dataset(f"images:{bomb}", tmp_path, cache_dir=cache)


def test_extraction_limits_are_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_labelled_folder(tmp_path / "src" / "pics", ["a", "b"], per_class=3)
    archive = tmp_path / "pics.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="pics")
    monkeypatch.setenv("OODTUNE_MAX_EXTRACT_MEMBERS", "4")
    with pytest.raises(DataError, match=r"more than 4 members.*OODTUNE_MAX_EXTRACT_MEMBERS"):
        safe_extract(archive, tmp_path / "out1")
    monkeypatch.delenv("OODTUNE_MAX_EXTRACT_MEMBERS")
    monkeypatch.setenv("OODTUNE_MAX_EXTRACT_BYTES", "1000")
    with pytest.raises(DataError, match=r"more than 1 kB.*OODTUNE_MAX_EXTRACT_BYTES"):
        safe_extract(archive, tmp_path / "out2")
    monkeypatch.setenv("OODTUNE_MAX_EXTRACT_BYTES", "lots")
    with pytest.raises(DataError, match="OODTUNE_MAX_EXTRACT_BYTES='lots' must be a positive number"):
        safe_extract(archive, tmp_path / "out3")
    monkeypatch.delenv("OODTUNE_MAX_EXTRACT_BYTES")
    assert (safe_extract(archive, tmp_path / "out4") / "pics" / "a").is_dir()
    with pytest.raises(DataError, match="archive bomb"):  # a gzip stream, stopped by the ratio bound
        safe_extract(_gz_tar_of_zeros(tmp_path / "z.tar.gz", 2 * 10**6), tmp_path / "out5",
                     ExtractLimits(max_ratio=10, ratio_floor=10**6))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _gz_tar_of_zeros(path: Path, size: int) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return path


def test_extraction_needs_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _gz_tar_of_zeros(tmp_path / "z.tar.gz", 10_000)
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda _p: type("U", (), {"free": 5000})())
    with pytest.raises(DataError, match=r"needs 10 kB but only 5 kB are free"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- 5. links through links

def _tar(path: Path, members: list[tuple[str, str, str | None]]) -> Path:
    """A tar of (name, kind 'file'|'sym'|'hard'|'dir', link target) members."""
    with tarfile.open(path, "w") as tf:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 4
                tf.addfile(info, io.BytesIO(b"evil"))
                continue
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[kind]
            info.linkname = target or ""
            tf.addfile(info)
    return path


LINK_ATTACKS = {
    # a -> . and a/b -> .. look harmless as strings (a/.. is inside), but on disk a/b is the parent of the folder
    "chain": ([("a", "sym", "."), ("a/b", "sym", ".."), ("a/b/escaped.txt", "file", None)], "passes through the link"),
    "target_through_link": ([("d", "dir", None), ("l", "sym", "d"), ("x", "sym", "l/../../escaped.txt")],
                            "passes through the link 'l'"),
    "hardlink_to_symlink": ([("s", "sym", "."), ("h", "hard", "s")], "passes through the link 's'"),
    "link_shares_a_path": ([("a", "dir", None), ("a", "sym", ".")], "a link and another member share this path"),
    "late_link_parent": ([("a/escaped.txt", "file", None), ("a", "sym", "..")], "passes through the link member 'a'"),
}


@pytest.mark.parametrize("data_filter", [True, False], ids=["with-stdlib-filter", "without-stdlib-filter"])
@pytest.mark.parametrize("attack", sorted(LINK_ATTACKS))
def test_members_through_links_are_refused_on_every_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           attack: str, data_filter: bool) -> None:
    members, why = LINK_ATTACKS[attack]
    archive = _tar(tmp_path / f"{attack}.tar", members)
    monkeypatch.setattr(archives, "_DATA_FILTER", data_filter and hasattr(tarfile, "data_filter"))
    dest = tmp_path / "work" / "cache" / "x"
    with pytest.raises(DataError, match=why) as exc:
        safe_extract(archive, dest)
    assert "refusing to extract" in str(exc.value) and "corrupt" not in str(exc.value)
    assert not list(tmp_path.rglob("escaped.txt")) and not dest.exists()
    assert list((tmp_path / "work" / "cache").iterdir()) == []


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="this Python has no tarfile extraction filter")
def test_a_stdlib_filter_refusal_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were our checks to miss something the standard library's filter catches, the error still says why."""
    archive = _tar(tmp_path / "abs.tar", [("l", "sym", "/etc/passwd")])
    monkeypatch.setattr(archives, "check_members", lambda *_a: None)
    with pytest.raises(DataError, match="refusing to extract member 'l'") as exc:
        safe_extract(archive, tmp_path / "out")
    assert "corrupt" not in str(exc.value)


def test_requires_python_matches_the_code() -> None:
    """tomllib (config files) needs Python 3.11; the package metadata, ruff and mypy must all say so."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["requires-python"] == ">=3.11"
    assert meta["tool"]["ruff"]["target-version"] == "py311" and meta["tool"]["mypy"]["python_version"] == "3.11"
    assert sys.version_info >= (3, 11)


# -------------------------------------------------------------- 3. decompression / resize amplification

def test_a_thin_image_is_refused_before_resizing(tmp_path: Path) -> None:
    """1 x 10^6 pixels: resizing the shorter side to 32 px would need 32 x 32*10^6 pixels."""
    line = tmp_path / "imgs" / "line.png"
    line.parent.mkdir()
    Image.new("L", (1_000_000, 1)).save(line)
    with pytest.raises(DataError, match=f"line.png: image of 1000000x1 pixels.*limit {MAX_PIXELS:,}"):
        decode_image(line, 32)
    with pytest.raises(DataError, match="extremely large or thin images are refused"):
        load_dataset(f"images:{line.parent}", tmp_path)
    with pytest.raises(DataError, match=r"arr\[0\]: image of 1000000x1"):
        array_to_resolution(np.zeros((1, 1, 1_000_000), np.uint8), 32, source="arr")
    Image.new("RGB", (64, 20)).save(tmp_path / "ok.png")  # ordinary shapes still decode
    assert decode_image(tmp_path / "ok.png", 32).shape == (32, 32, 3)


def test_a_huge_declared_image_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    Image.new("L", (9000, 9000)).save(big)  # 81 M pixels, above the limit of 2**26

    def no_decoding(*_a: Any, **_k: Any) -> None:
        raise AssertionError("decoded although the header already says the image is too large")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(DataError, match="image of 9000x9000 pixels"):
        decode_image(big, 32)


# --------------------------------------------------------------------------- 4. non-regular files

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path: Path) -> None:
    folder = write_labelled_folder(tmp_path / "pics", ["a", "b"], per_class=1)
    os.mkfifo(folder / "a" / "blocked.jpg")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung on a FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(DataError, match="blocked.jpg: not a regular file"):
            load_dataset(f"folder:{folder}", tmp_path, cache_dir=tmp_path / "cache")
        with pytest.raises(DataError, match="not a regular file"):
            decode_image(folder / "a" / "blocked.jpg", 32)
    finally:
        signal.alarm(0)


# ------------------------------------------------------------------------------ 6. absurd architectures

def test_wrn_parameter_count_matches_the_built_network() -> None:
    for depth, width, classes in [(10, 1, 10), (16, 2, 7), (16, 4, 100), (22, 3, 10), (40, 2, 10)]:
        net = build_model(f"wrn-{depth}-{width}", classes)
        assert wrn_parameters(depth, width, classes) == sum(p.numel() for p in net.parameters())
    assert wrn_parameters(28, 10, 10) == 36_479_194  # the published WRN-28-10 size (36.5 M)


@pytest.mark.parametrize(("arch", "match"), [("wrn-1000000-1000", "parameters, more than"),
                                             ("wrn-10-100000", "parameters, more than"),
                                             ("wrn-4-2", "n >= 1"), ("wrn-10-0", "width >= 1")])
def test_absurd_architectures_are_refused(arch: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(arch, 10)
    assert MAX_PARAMETERS == 2**30


def test_absurd_architecture_from_the_command_line(env: dict[str, Path]) -> None:
    fails("pretrain", "--arch", "wrn-1000000-1000", "--data-root", env["root"], "--out", env["tmp"] / "huge",
          *FAST, match="choose a smaller depth or width", code=1)
    assert not (env["tmp"] / "huge").exists()
    ok("pretrain", "--arch", "wrn-10-1", "--data-root", env["root"], "--out", env["tmp"] / "fine", *FAST)
