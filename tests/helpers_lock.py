"""Another live process holding an output folder's lock, as a benchmark process at work there would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLDER = """
import sys, time
from oodtune.utils.lock import output_lock
with output_lock(sys.argv[1], shared=sys.argv[2] == "shared"):
    print("locked", flush=True)
    time.sleep(60)
"""


@contextmanager
def lock_held_elsewhere(folder: Path, *, shared: bool) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``folder``'s lock (shared: an ``--only`` / ``--seed`` process; else a run of the whole
    folder) until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), "shared" if shared else "exclusive"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
