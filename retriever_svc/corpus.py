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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.errors import InvalidArgument
from rag.files import open_bytes, require_regular_file
from rag.types import passage_problem

FORMATS = ("jsonl", "dpr-tsv")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    line: int = field(default=0, compare=False)  # where it starts in the corpus file, for error messages


def guess_format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return "dpr-tsv" if name.endswith(".tsv") else "jsonl"


def read_documents(path: Path, fmt: str) -> Iterator[Document]:
    """The corpus's documents in order; a file that is not UTF-8 text (or not gzip, when named .gz) is refused
    with the line where reading stopped."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")
    require_regular_file(path, "corpus", "a .jsonl or .tsv file (.gz allowed)")
    reader = _read_jsonl if fmt == "jsonl" else _read_dpr_tsv
    last = 0
    try:
        for document in reader(path):
            last = document.line
            yield document
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise InvalidArgument(f"{path}: cannot be read after line {last} ({err}); is it a whole gzip file?") from None


def _lines(path: Path) -> Iterator[str]:
    """The file's lines (decompressed when it ends in .gz), each decoded as UTF-8 on its own, so that a line
    that is not UTF-8 is named by its number."""
    with open_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidArgument(
                    f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start}); re-encode it, "
                    "e.g. iconv -f latin1 -t utf-8"
                ) from None


def _text_field(record: dict[str, Any], key: str, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {json.dumps(value)[:40]}")
    return value


def _read_jsonl(path: Path) -> Iterator[Document]:
    for line_number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str | int):
                raise TypeError("'id' must be a string or an integer")
            title, text = _text_field(record, "title", False), _text_field(record, "text", True)
        except (json.JSONDecodeError, TypeError) as err:
            raise InvalidArgument(
                f"{path}:{line_number}: expected a JSON object with id, title and text ({err})"
            ) from err
        yield Document(str(record["id"]), title, text, line_number)


def _read_dpr_tsv(path: Path) -> Iterator[Document]:
    csv.field_size_limit(sys.maxsize)
    rows = csv.reader(_lines(path), delimiter="\t")
    header = next(rows, None)
    if header is None:
        return
    if [h.strip().lower() for h in header[:3]] != ["id", "text", "title"]:
        raise InvalidArgument(f"{path}: a DPR TSV starts with the header id<TAB>text<TAB>title, got {header!r}")
    for row in rows:
        if not row:
            continue
        if len(row) < 3:
            raise InvalidArgument(f"{path}:{rows.line_num}: expected id<TAB>text<TAB>title, got {len(row)} fields")
        yield Document(row[0], row[2], row[1], rows.line_num)


def split_passages(doc: Document, passage_words: int = 100) -> Iterator[Document]:
    words = doc.text.split()
    if len(words) <= passage_words:
        yield Document(doc.id, doc.title, " ".join(words), doc.line)
        return
    parts = math.ceil(len(words) / passage_words)
    size = math.ceil(len(words) / parts)
    for n, start in enumerate(range(0, len(words), size)):
        yield Document(f"{doc.id}-{n}", doc.title, " ".join(words[start : start + size]), doc.line)


def check_passages(passages: Iterator[Document], path: Path, max_reported: int = 10) -> Iterator[Document]:
    """The passages, checked with the rule the generator applies to what it reads (rag.types.passage_problem); a
    corpus with bad passages is refused as a whole, naming the first `max_reported` by line."""
    problems: list[str] = []
    count = 0
    for passage in passages:
        problem = passage_problem(passage.title, passage.text)
        if problem is None:
            yield passage
            continue
        count += 1
        if len(problems) < max_reported:
            problems.append(f"{path}:{passage.line}: passage {passage.id!r} {problem}")
    if problems:
        more = f"\n... and {count - len(problems)} more" if count > len(problems) else ""
        raise InvalidArgument(
            f"{count} passage(s) no generator would read; fix or drop them:\n" + "\n".join(problems) + more
        )
