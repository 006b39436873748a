"""Index names and versions: `NAME@VERSION`, e.g. `wiki@v3`. The patterns admit no path separators, so a
reference can only name a directory directly under the index root."""

from __future__ import annotations

import re

from rag.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^v(\d+)$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidArgument(
            f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol"
        )
    return name


def check_version(version: str) -> str:
    if not VERSION_PATTERN.match(version):
        raise InvalidArgument(
            f"index version {version!r} must look like v<N> (a version directory under the index root)"
        )
    return version


def parse_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` -> (name, version), both validated."""
    name, at, version = ref.partition("@")
    if not at:
        raise InvalidArgument(f"index version {ref!r} must be NAME@VERSION, e.g. wiki@v2")
    return check_name(name), check_version(version)
