"""The maskless app: the `maskless` CLI, the run configuration and the pipeline that wires the stages.

The stage packages live in the repository's own folders (core/, ingest/, pseudo/, train/) and install
as maskless.core, maskless.ingest, maskless.pseudo and maskless.train (pyproject.toml's package-dir).
Run from a source checkout that is not installed (a bare GPU machine, a git worktree), the same names
resolve to the folders beside this package."""
import os as _os

__version__ = "0.1.0"

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isdir(_os.path.join(_checkout, "core")):
    __path__.append(_checkout)  # noqa: F821 (a package's own __path__)
