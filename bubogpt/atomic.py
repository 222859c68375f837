"""Atomic folder writes: build a folder under a hidden temporary name beside its final place, then
rename it into place, so a write killed half-way never leaves a half-written folder under the final
name (and an older folder of that name stays usable until the new one is complete).

    with atomic_directory(out / "model") as staging:
        write_everything_into(staging)

or, where the staging folder must outlive one block (a write spread over several steps):

    staging = staging_directory(out)
    ...
    replace_directory(staging, out)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_directory(final: str | Path) -> Path:
    """A fresh hidden sibling of `final` (`.NAME.partial-XXXX`) to write into."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))


def replace_directory(staging: str | Path, final: str | Path) -> Path:
    """Move a fully written `staging` folder to `final`. An older folder of that name is moved aside
    first and deleted last, so at every moment `final` is either the old or the new folder."""
    staging, final = Path(staging), Path(final)
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yields a staging folder; on success it replaces `final`, on an error it is deleted."""
    staging = staging_directory(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, final)
