"""Running the ``oodtune`` command line in tests (click's CliRunner): invoke, expect success, expect a clean error."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner, Result

from oodtune.cli import main

#: Options that make any training command take one tiny CPU step.
FAST = ["--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--device", "cpu"]


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: Any) -> Result:
    res = invoke(*args)
    assert res.exit_code == 0, (args, res.output, res.exception)
    return res


def fails(*args: Any, match: str, code: int | None = None) -> Result:
    """The command fails with a message containing ``match`` (case-insensitive) and no traceback."""
    res = invoke(*args)
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert match.lower() in res.output.lower(), res.output
    assert "Traceback" not in res.output
    return res
