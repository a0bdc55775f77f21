"""Safe archive extraction: traversal, absolute paths and escaping links are rejected."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from fixtures_data import make_read_only, make_tar, make_zip, malicious_tars, write_labelled_folder
from oodtune.data import DataError
from oodtune.data.archives import extract_cached, is_archive, safe_extract


@pytest.mark.parametrize("attack", ["dotdot", "nested_dotdot", "absolute", "symlink", "abs_symlink", "hardlink"])
def test_malicious_tar_rejected_before_writing(tmp_path, attack):
    archive = malicious_tars(tmp_path / "src")[attack]
    dest = tmp_path / "out" / "x"
    with pytest.raises(DataError, match="refusing to extract") as exc:
        safe_extract(archive, dest)
    assert archive.name in str(exc.value)
    assert not (dest / "good" / "a.txt").exists()  # checked before anything is written
    assert not (tmp_path / "out" / "evil").exists() and not Path("/tmp/oodtune-evil-abs").exists()


def test_malicious_zip_rejected(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr("../evil.txt", "evil")
    with pytest.raises(DataError, match=r"\.\."):
        safe_extract(z, tmp_path / "out")
    z2 = tmp_path / "abs.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.writestr("/abs/evil.txt", "evil")
    with pytest.raises(DataError, match="absolute"):
        safe_extract(z2, tmp_path / "out2")
    z3 = tmp_path / "link.zip"
    with zipfile.ZipFile(z3, "w") as zf:
        info = zipfile.ZipInfo("d/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../outside")
    with pytest.raises(DataError, match="escapes"):
        safe_extract(z3, tmp_path / "out3")


def test_internal_symlink_allowed(tmp_path):
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("hi")
    os.symlink("f.txt", src / "d" / "alias.txt")
    archive = make_tar(src, tmp_path / "t.tar.gz")
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "tree" / "d" / "alias.txt").read_text() == "hi"


def test_extract_cached_goes_to_cache_not_source_and_is_reused(tmp_path):
    folder = write_labelled_folder(tmp_path / "src" / "pics", ["a", "b"], per_class=1)
    archive = make_zip(folder, tmp_path / "src" / "pics.zip")
    make_read_only(tmp_path / "src")
    try:
        first = extract_cached(archive, tmp_path / "cache")
        assert first.is_relative_to(tmp_path / "cache")
        assert (first / "pics" / "a").is_dir()
        assert extract_cached(archive, tmp_path / "cache") == first
        assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["pics", "pics.zip"]
        assert not any(p.name.startswith(".") for p in first.parent.iterdir())  # no temp dirs left
    finally:
        os.chmod(tmp_path / "src", 0o755)


def test_corrupt_archive_is_data_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="bad.tar.gz"):
        safe_extract(bad, tmp_path / "out")


def test_is_archive():
    assert is_archive("x.tar.gz") and is_archive("X.ZIP") and is_archive("a.tgz") and is_archive("a.tar")
    assert not is_archive("x.jpg")
    assert tarfile.is_tarfile  # stdlib sanity
