"""Progress reporting: plain one-line reports when stderr is not a terminal, nested bars, logging on the console."""

from __future__ import annotations

import logging

import pytest

import oodtune.utils.progress as progress
from oodtune.utils.progress import ConsoleHandler, progress_bar, progress_mode


def test_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("OODTUNE_PROGRESS", "0")
    assert progress_mode() == "off"
    monkeypatch.setenv("OODTUNE_PROGRESS", "rich")
    assert progress_mode() == "rich"
    monkeypatch.setenv("OODTUNE_PROGRESS", "1")
    assert progress_mode() == "plain"  # pytest's captured stderr is not a terminal


def test_plain_reports_are_single_unwrapped_lines(monkeypatch, capsys):
    monkeypatch.setenv("OODTUNE_PROGRESS", "plain")
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # report on every advance
    name = "decoding a-dataset-with-a-rather-long-name-that-would-wrap-at-eighty-columns-in-a-rich-console"
    with progress_bar(name, total=4) as bar:
        for _ in range(4):
            bar.advance(1)
            bar.update(rate="12 img/s")
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[-1] == "" and all(lines[:-1]) and len(lines) - 1 == 4  # one per advance; the end is not repeated
    assert "\r" not in err and "\x1b" not in err
    assert lines[1].startswith(f"{name}: 2/4 (50%), 12 img/s, elapsed 0:00:00, ETA") and len(lines[1]) > 80
    assert lines[-2].startswith(f"{name}: 4/4 (100%)") and "ETA" not in lines[-2]
    with progress_bar("short", total=3) as bar:  # finished before the first interval: one line at the end
        monkeypatch.setattr(progress, "PLAIN_INTERVAL", 60.0)
        bar.advance(3)
    assert capsys.readouterr().err.startswith("short: 3/3 (100%), elapsed")


def test_nested_rich_bars_share_one_display(monkeypatch):
    monkeypatch.setenv("OODTUNE_PROGRESS", "rich")
    with progress_bar("outer", total=2) as outer:
        with progress_bar("inner", total=3) as inner:  # rich allows one live display: the inner one joins it
            inner.advance(3)
        outer.advance(2)
    assert progress._shown is None


def test_console_handler_prefixes_warnings(capsys):
    logger = logging.getLogger("oodtune.test-progress")
    handler = ConsoleHandler()
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("a long warning " + "x" * 100)
        logger.info("plain info")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: a long warning " + "x" * 100, "plain info"]


@pytest.mark.parametrize("mode", ["0", "plain"])
def test_bars_are_usable_in_every_mode(monkeypatch, mode):
    monkeypatch.setenv("OODTUNE_PROGRESS", mode)
    with progress_bar("x", total=None) as bar:
        bar.advance(5)
        bar.update(rate="1 img/s", description="y")
