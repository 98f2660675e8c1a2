"""Failures a user can act on: the CLI prints them as `maskless: error: ...` and exits 2, no traceback."""
from __future__ import annotations

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class IncompleteRun(RuntimeError):
    """A command that kept everything it finished and failed on the rest; its message names what
    failed, and rerunning the same command does only the rest."""


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL
