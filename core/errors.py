"""Failures a user can act on: the CLI prints them as `maskless: error: ...` and exits 2, no traceback."""
from __future__ import annotations

import contextlib
import errno
from typing import Callable, Iterator, Union

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class IncompleteRun(RuntimeError):
    """A command that kept everything it finished and failed on the rest; its message names what
    failed, and rerunning the same command does only the rest."""

    @classmethod
    def of_units(cls, stage: str, missing: list[str], why: object) -> "IncompleteRun":
        """The error of a stage whose work units `missing` were not written, for reason `why`."""
        names = ", ".join(missing[:20]) + (", ..." if len(missing) > 20 else "")
        return cls(f"{stage}: {len(missing)} unit(s) not written ({names}): {why or 'see the Ray logs'}; "
                   f"rerun the same command to redo them")


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


@contextlib.contextmanager
def disk_full_is_one_line(writing: Union[str, Callable[[], str]], kept: str) -> Iterator[None]:
    """A full disk (or quota) inside the block becomes one OSError line the CLI prints: what was being
    written (`writing`, or a function giving it at the time of the failure), that freeing space and
    rerunning is the fix, and what the rerun keeps. Other errors pass through unchanged."""
    try:
        yield
    except OSError as e:
        if not disk_full(e):
            raise
        what = writing() if callable(writing) else writing
        raise OSError(e.errno, f"no space left on device writing {what}: free space and rerun the same "
                               f"command ({kept})") from e
