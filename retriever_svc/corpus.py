"""Corpus readers and DPR-style passage splitting.

Formats:
- `jsonl`: one `{"id", "title", "text"}` object per line;
- `dpr-tsv`: DPR's `psgs_w100.tsv`, `id<TAB>text<TAB>title` with a header row and CSV quoting.
Documents longer than `passage_words` are split into near-equal passages of at most that many words (DPR's
unit is 100 words); the title stays with every passage, ids become `<doc id>-<n>`.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rag.errors import InvalidArgument
from rag.files import open_text

FORMATS = ("jsonl", "dpr-tsv")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def guess_format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return "dpr-tsv" if name.endswith(".tsv") else "jsonl"


def read_documents(path: Path, fmt: str) -> Iterator[Document]:
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise InvalidArgument(f"corpus {path} does not exist")
    reader = _read_jsonl if fmt == "jsonl" else _read_dpr_tsv
    yield from reader(path)


def _read_jsonl(path: Path) -> Iterator[Document]:
    with open_text(path, newline="") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield Document(str(record["id"]), str(record.get("title") or ""), str(record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InvalidArgument(
                    f"{path}:{line_number}: expected a JSON object with id, title and text ({err})"
                ) from err


def _read_dpr_tsv(path: Path) -> Iterator[Document]:
    csv.field_size_limit(sys.maxsize)
    with open_text(path, newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        header = next(rows, None)
        if header is None:
            return
        if [h.strip().lower() for h in header[:3]] != ["id", "text", "title"]:
            raise InvalidArgument(f"{path}: a DPR TSV starts with the header id<TAB>text<TAB>title, got {header!r}")
        for line_number, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) < 3:
                raise InvalidArgument(f"{path}:{line_number}: expected id<TAB>text<TAB>title, got {len(row)} fields")
            yield Document(row[0], row[2], row[1])


def split_passages(doc: Document, passage_words: int = 100) -> Iterator[Document]:
    words = doc.text.split()
    if len(words) <= passage_words:
        yield Document(doc.id, doc.title, " ".join(words))
        return
    parts = math.ceil(len(words) / passage_words)
    size = math.ceil(len(words) / parts)
    for n, start in enumerate(range(0, len(words), size)):
        yield Document(f"{doc.id}-{n}", doc.title, " ".join(words[start : start + size]))
