"""The on-disk layout of versioned, sharded passage indexes, and the manifest that describes each version.

An index root holds named indexes; each build is a new immutable version directory:

    <root>/<name>/v<N>/
        manifest.json         encoder identity, dim, metric, index type, counts, corpus source, created-at,
                              and the checksum of every file
        shard-<i>/passages.sqlite   row -> (id, title, text)
                  embeddings.npy    float32 [count, dim], row-aligned; memory-mapped when loaded
                  ann.faiss         only for approximate index types (HNSW, IVF-PQ, faiss factory strings)
                  lexical/          the BM25 index (retriever_svc.lexical), unless built with --no-lexical

Shard i holds the i-th contiguous slice of the corpus's passages; a retriever serves one shard. Building is
retriever_svc.build, loading and searching retriever_svc.search; this module needs neither torch nor faiss, so
`rag index list` and manifest checks start fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag.errors import FailedPrecondition, InvalidArgument, NotFound
from rag.files import sha256_file
from rag.index_ref import VERSION_PATTERN, IndexRef

MANIFEST = "manifest.json"
PASSAGES = "passages.sqlite"
PASSAGES_SCHEMA = (
    "CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL)"
)
EMBEDDINGS = "embeddings.npy"
ANN = "ann.faiss"
FORMAT_VERSION = 1


def shard_dir(shard: int) -> str:
    return f"shard-{shard}"


@dataclass(frozen=True)
class EncoderInfo:
    """What an index records about the encoder that built it."""

    kind: str
    spec: str
    question_identity: str
    passage_identity: str
    dim: int
    score_temperature: float

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncoderInfo:
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    format_version: int
    index_type: str
    faiss_factory: str
    metric: str
    dim: int
    count: int
    num_shards: int
    shard_counts: list[int]
    encoder: EncoderInfo
    corpus: dict[str, str]
    checksums: dict[str, str]  # "shard-<i>/<file>" -> sha256
    created_at: str
    embeddings_reused: dict[str, object] = dataclasses.field(default_factory=dict)  # {"from": ref, "passages": n}
    # The lexical index: analyzer, BM25 parameters, global statistics, build time and size; {} when there is none.
    lexical: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        data = dict(self.__dict__, encoder=self.encoder.to_json())
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            data["encoder"] = EncoderInfo.from_json(data["encoder"])
            return cls(**data)
        except FileNotFoundError as err:
            raise FailedPrecondition(
                f"{path.parent} has no {MANIFEST}: not a published index version", reason="no_manifest"
            ) from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FailedPrecondition(f"{path} is not a valid index manifest: {err}", reason="bad_manifest") from err

    @property
    def ref(self) -> IndexRef:
        return IndexRef(self.name, self.version)


# --------------------------------------------------------------------------------------------------------
# Naming and listing
# --------------------------------------------------------------------------------------------------------


def versions(root: Path, name: str) -> list[str]:
    """Published versions of `name`, oldest first."""
    directory = root / name
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in directory.iterdir() if (m := VERSION_PATTERN.fullmatch(p.name))]
    return [version for _, version in sorted(found)]


def index_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and versions(root, p.name)) if root.is_dir() else []


def resolve(root: Path, wanted: IndexRef | None) -> Path:
    """The directory of `wanted` under `root` (no version: the newest; None: the only index there), refusing
    anything outside the root."""
    if wanted is None:
        names = index_names(root)
        if len(names) != 1:
            raise InvalidArgument(f"name the index to serve (NAME[@VERSION]); {root} holds {names or 'none'}")
        wanted = IndexRef(names[0])
    available = versions(root, wanted.name)
    if not available:
        raise NotFound(
            f"no index named {wanted.name!r} under {root}; build one with `rag index build --name {wanted.name}`",
            reason="not_found",
        )
    version = wanted.version or available[-1]
    if version not in available:
        raise NotFound(
            f"index {wanted.name!r} has no version {version!r}; it has {', '.join(available)}", reason="not_found"
        )
    directory = (root / wanted.name / version).resolve()
    if not directory.is_relative_to(root.resolve()):  # a symlinked version must not lead outside the root
        raise InvalidArgument(f"{wanted.at(version)} resolves outside the index root {root}")
    if directory != root.resolve() / wanted.name / version:  # it would load under its target's name
        target = directory.relative_to(root.resolve())
        raise FailedPrecondition(
            f"{wanted.at(version)} is a symbolic link to {target}; a version is served from its own directory only: "
            f"swap to {target.as_posix().replace('/', '@', 1)} itself",
            reason="symlink",
        )
    return directory


def file_damage(version_dir: Path, file: str, digest: str) -> tuple[str, str] | None:
    """Why a published file of a version is no longer what its manifest's checksum says, as (metric reason,
    message); None while it is. What the retriever checks before serving a version and a build before reusing it."""
    try:
        if sha256_file(version_dir / file) == digest:
            return None
    except OSError as err:  # deleted or unreadable since it was published
        return "missing_file", f"{file} cannot be read ({err.strerror})"
    return "checksum", f"checksum mismatch for {file}"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
