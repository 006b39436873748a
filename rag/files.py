"""Files written so that nothing is ever half-written, and their checksums."""

from __future__ import annotations

import gzip
import hashlib
import io
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rag.errors import InvalidArgument


def require_regular_file(path: Path, what: str, expected: str) -> None:
    """INVALID_ARGUMENT unless `path` is a regular file, saying what it is instead: a directory, nothing, or a
    device, FIFO or socket (which a reader would block on, or read without end)."""
    if path.is_dir():
        raise InvalidArgument(f"{what} {path} is a directory; give {expected}")
    if not path.exists():
        raise InvalidArgument(f"{what} {path} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"{what} {path} is not a regular file (a device, FIFO or socket); give {expected}")


def open_text(path: Path, newline: str | None = None) -> IO[str]:
    """A UTF-8 text file, decompressed on the fly when its name ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return path.open("r", encoding="utf-8", newline=newline)


def open_bytes(path: Path) -> gzip.GzipFile | io.BufferedReader:
    """The same file as bytes (for readers that decode line by line and name the line that is not UTF-8)."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_identity(path: Path) -> str:
    """sha256 over a model's files (name and content; a single file's content), so a copied or renamed model keeps
    its identity and one changed in place does not."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(".") or "/." in relative or file.name.lower() == "readme.md":
            continue
        digest.update(relative.encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """Yield a fresh temp path beside `target` (make it a file or a directory); it is renamed onto `target`
    only if the block completes, and removed otherwise. A directory already at `target` is replaced: moved
    aside, the new one renamed into place, then the old one deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(target)  # atomic
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    with publishing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
