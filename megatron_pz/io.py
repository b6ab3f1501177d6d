"""Atomic file helpers: readers see the old content or the new, never a half-written file or folder.

Every writer that must survive a kill -9 (checkpoints, weight versions, HF exports, reports, tracker files)
goes through these; nothing else in the package calls ``os.replace`` for that purpose.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def atomic_dir(dst: str | os.PathLike) -> "AtomicDir":
    return AtomicDir(Path(dst))


class AtomicDir:
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``dst``."""

    def __init__(self, dst: Path):
        self.dst = dst
        self.tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        fsync_tree(self.tmp)
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        fsync_tree(self.dst.parent, files=False)


def fsync_tree(path: Path, files: bool = True) -> None:
    """fsync the regular files directly inside ``path`` (when ``files``) and the folder entry itself."""
    if files and path.is_dir():
        for p in path.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a small text file so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding=encoding) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_replace(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished ``tmp`` (file or folder) to ``final``, replacing what is there in one rename."""
    os.replace(tmp, final)
