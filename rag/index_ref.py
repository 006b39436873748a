"""Index names and versions: `NAME@VERSION`, e.g. `wiki@v3`, parsed once into an `IndexRef`.

The patterns admit no path separators (and, matched whole, no trailing newline), so a reference can only name
a directory directly under the index root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rag.errors import InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VERSION_PATTERN = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class IndexRef:
    """An index name and one of its versions; `version` is "" only where "the newest" is meant."""

    name: str
    version: str = ""

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name) or ".." in self.name:
            raise InvalidArgument(
                f"index name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol"
            )
        if self.version and not VERSION_PATTERN.fullmatch(self.version):
            raise InvalidArgument(
                f"index version {self.version!r} must look like v<N> (a version directory under the index root)"
            )

    @classmethod
    def parse(cls, text: str, version_required: bool = True) -> IndexRef:
        """`NAME@VERSION` (or `NAME[@VERSION]` where the version may be left to mean the newest)."""
        name, at, version = text.partition("@")
        if version_required and not (at and version):
            raise InvalidArgument(f"index version {text!r} must be NAME@VERSION, e.g. wiki@v2")
        if at and not version:
            raise InvalidArgument(f"index {text!r} ends in '@'; give NAME or NAME@VERSION")
        return cls(name, version)

    def at(self, version: str) -> IndexRef:
        return IndexRef(self.name, version)

    @property
    def number(self) -> int:
        """The version number (v3 -> 3)."""
        match = VERSION_PATTERN.fullmatch(self.version)
        if match is None:
            raise ValueError(f"{self} names no version")
        return int(match.group(1))

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name
