"""Write an export into a temporary folder beside `--out` and move it into place only once it is complete, so a
failed or interrupted export never leaves a partial shard (or a half-overwritten earlier export) in `--out`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoefitError

# Files of an earlier export that a new one replaces as a whole set (their number and names change with sharding).
_STALE = ("model*.safetensors", "model.safetensors.index.json")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """`out` must be new or an empty directory, unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise MoefitError(f"{out}: exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MoefitError(f"{out}: the directory is not empty. Choose a new --out directory (or pass --overwrite "
                          "to write into it).")


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder `.<out name>.*.partial` beside `out` to write into. When the block ends normally its files
    move into `out` (created, or with `overwrite` merged into it: same-named files and the old weight shards
    replaced). On any exception, Ctrl-C included, the folder is removed and `out` is left as it was; an OSError
    (disk full, permissions) becomes a MoefitError that says so."""
    out = Path(out)
    check_out_dir(out, overwrite)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        _publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # innermost first: only the folders this call made, and only if still empty
            try:
                p.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):  # disk full, permissions, a vanished folder: the user's to fix
            raise MoefitError(f"{out}: the export could not be written ({e.strerror or e}"
                              f"{f': {e.filename}' if e.filename else ''}); nothing was left in {out}. Free some "
                              "space or choose another --out, then run the export again.") from None
        raise


def _publish(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    for pattern in _STALE:
        for old in out.glob(pattern):
            old.unlink()
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
