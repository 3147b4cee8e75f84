"""One way to write a file or a folder that must survive a crash.

Write to a temporary sibling, fsync it, rename it over the target, fsync the parent folder: a
killed process or a power cut leaves the old target or the new one, never a renamed-but-empty file.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_sibling(path: Path) -> Path:
    """A temporary name next to `path`, private to this process."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _commit_dir(tmp: Path, target: Path, replace: bool) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    fsync_dir(tmp)
    old = None
    if target.exists() and replace:
        old = target.with_name(f"{target.name}.old{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same folder first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(target: str | Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `target`'s content to; on success it replaces `target`.

    directory: the content is a folder (created empty). replace=False keeps an existing folder
    (first writer wins). On an exception the temporary path is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            _commit_dir(tmp, target, replace)
        else:
            _fsync_file(tmp)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
