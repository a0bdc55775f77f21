"""keep_freed_memory: glibc serves large allocations from its heap and keeps freed pages (a freed 64 MiB buffer
stays resident), the opt-out and other C libraries leave the policy alone, and the command line applies it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from oodtune.utils import memory
from oodtune.utils.memory import keep_freed_memory, restore_malloc_defaults

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: Allocates and touches a 64 MiB tensor, frees it, and prints the resident MiB the free gave back.
PROBE = textwrap.dedent("""
    import os, sys, torch
    from oodtune.utils.memory import keep_freed_memory, restore_malloc_defaults
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
    mode = sys.argv[1]  # default: glibc's policy; keep: the policy; restore: the policy, then undone
    applied = mode != "default" and keep_freed_memory()
    if mode == "restore":
        applied = applied and not restore_malloc_defaults()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    before = rss()
    del x
    print(applied, before - rss())
""")


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's")
def test_freed_buffer_stays_resident_only_with_the_policy() -> None:
    applied, released = _probe("default")
    assert not applied and released > 60  # glibc's default: the 64 MiB mapping goes back at once
    applied, released = _probe("keep")
    assert applied and released < 4  # kept in the heap for the next step


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's")
def test_opt_out_keeps_the_default_policy() -> None:
    applied, released = _probe("keep", {"OODTUNE_MALLOC": "default"})
    assert not applied and released > 60


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False
    assert restore_malloc_defaults() is False


def test_negative_trim_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(-1)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's")
def test_restore_gives_freed_buffers_back_again() -> None:
    applied, released = _probe("restore")
    assert not applied and released > 60


def test_the_command_line_applies_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from click.testing import CliRunner

    from oodtune import cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    res = CliRunner().invoke(cli.main, ["pretrain", "--threads", "99", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--threads 99" in res.output  # refused after the policy was applied ...
    assert calls == [1]  # ... once, before anything else ran
