"""Retriever: corpus formats, index builds (flat, HNSW, IVF-PQ; sentence-transformer and DPR encoders),
exact search against faiss' brute force, and the RetrieverService contract."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import pytest

from rag.errors import InvalidArgument
from rag.index_ref import IndexRef
from rag.v1 import retriever_pb2, retriever_pb2_grpc
from rag_cli.main import main as rag_cli
from rag_cli.testing.stack import Launcher, address
from retriever_svc.build import build_index
from retriever_svc.corpus import Document, read_documents, split_passages
from retriever_svc.encoders import load_encoder
from retriever_svc.layout import Manifest, versions
from retriever_svc.lexical import FILES as LEXICAL_FILES
from tests.conftest import (
    FACTS,
    Services,
    TinyModels,
    build,
    corpus_records,
    details,
    index_build_args,
    passage_ids,
    write_jsonl,
)

QUESTIONS = ["Who discovered penicillin?", "What is the capital of France?", "How high is Mount Everest?"]


def search(address: str, questions: list[str], k: int, **flags: Any) -> retriever_pb2.SearchResponse:
    """Dense search unless `flags` name another retrieval mode (tests/test_hybrid.py covers lexical and hybrid)."""
    flags.setdefault("retrieval", retriever_pb2.RETRIEVAL_MODE_DENSE)
    with grpc.insecure_channel(address) as channel:
        return retriever_pb2_grpc.RetrieverServiceStub(channel).Search(
            retriever_pb2.SearchRequest(questions=questions, k=k, **flags), timeout=60
        )


# ---------------------------------------------------------------------------------------------- corpus


def test_dpr_tsv_reader_handles_csv_quoting(tmp_path: Path) -> None:
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        '2\t"A text with a\ttab inside quotes"\t"Quoted Title"\n'
        "3\tplain text, no quotes\tPlain\n",
        encoding="utf-8",
    )
    docs = list(read_documents(tsv, "dpr-tsv"))
    assert docs == [
        Document("1", "Aaron", 'Aaron ( or ; "Ahärôn") is a prophet'),
        Document("2", "Quoted Title", "A text with a\ttab inside quotes"),
        Document("3", "Plain", "plain text, no quotes"),
    ]


def test_dpr_tsv_without_header_is_rejected(tmp_path: Path) -> None:
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("1\tsome text\ttitle\n")
    with pytest.raises(InvalidArgument, match="header"):
        list(read_documents(tsv, "dpr-tsv"))


def test_jsonl_reader_names_the_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "A", "text": "fine"}\n{"id": "b", "title": "B"}\n')
    with pytest.raises(InvalidArgument, match="bad.jsonl:2"):
        list(read_documents(bad, "jsonl"))


def test_long_documents_split_into_near_equal_passages_keeping_the_title() -> None:
    doc = Document("d", "Title", " ".join(f"w{i}" for i in range(250)))
    passages = list(split_passages(doc, passage_words=100))
    assert [p.id for p in passages] == ["d-0", "d-1", "d-2"]
    assert [len(p.text.split()) for p in passages] == [84, 84, 82]
    assert all(p.title == "Title" for p in passages)
    assert " ".join(p.text for p in passages) == doc.text
    assert list(split_passages(Document("s", "T", "short text"))) == [Document("s", "T", "short text")]


# ---------------------------------------------------------------------------------------------- builds


def test_build_writes_a_validated_manifest_and_new_versions(tmp_path: Path, tiny: TinyModels, corpus: Path) -> None:
    root = tmp_path / "indexes"
    args = index_build_args(corpus, root, "wiki", tiny.encoder_spec)
    assert rag_cli(args) == 0
    assert rag_cli(args) == 0
    assert versions(root, "wiki") == ["v1", "v2"]
    manifest = Manifest.from_file(root / "wiki" / "v2" / "manifest.json")
    encoder = load_encoder(tiny.encoder_spec)
    assert manifest.ref == IndexRef("wiki", "v2")
    assert manifest.encoder.question_identity == encoder.info.question_identity
    assert manifest.dim == encoder.info.dim and manifest.metric == "inner_product"
    documents = read_documents(corpus, "jsonl")
    assert manifest.count == sum(len(list(split_passages(d))) for d in documents) > len(corpus_records())
    lexical = {f"shard-0/lexical/{f}" for f in (*LEXICAL_FILES, "idf.npy")}  # the BM25 index, by default
    assert set(manifest.checksums) == {"shard-0/passages.sqlite", "shard-0/embeddings.npy", *lexical}
    assert manifest.lexical["documents"] == manifest.count and manifest.lexical["analyzer"]["stemmer"]
    assert manifest.num_shards == 1 and manifest.shard_counts == [manifest.count]
    assert not [p for p in (root / "wiki").iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_no_version_and_no_temp_files(tmp_path: Path, tiny: TinyModels) -> None:
    corpus = write_jsonl(tmp_path / "dup.jsonl", [FACTS[0], FACTS[0]])
    root = tmp_path / "indexes"
    with pytest.raises(InvalidArgument, match="occurs twice"):
        build_index(corpus, "jsonl", root, "dup", load_encoder(tiny.encoder_spec), show_progress=False)
    assert list((root / "dup").iterdir()) == []


GOOD_LINE = '{"id": "ok", "title": "Fine", "text": "A passage any generator reads."}\n'


def _bad_corpus(tmp_path: Path, case: str) -> Path:
    if case == "directory":
        return tmp_path
    if case == "device":
        return Path("/dev/zero")  # endless: reading it would never finish
    if case == "fifo":
        os.mkfifo(tmp_path / "corpus.jsonl")  # nobody writes: reading it would block for ever
        return tmp_path / "corpus.jsonl"
    name = "corpus.jsonl.gz" if "gzip" in case else "corpus.jsonl"
    lines = {
        "empty passage": '{"id": "e", "title": "", "text": "  "}\n',
        "null text": '{"id": "n", "title": "T", "text": null}\n',
        "a 25k-character word": json.dumps({"id": "w", "title": "T", "text": "x" * 25_000}) + "\n",
        "a 2k-character title": json.dumps({"id": "t", "title": "T" * 2_000, "text": "text"}) + "\n",
    }
    data = (GOOD_LINE + lines.get(case, "")).encode()
    if case == "latin-1":
        data = GOOD_LINE.encode() + '{"id": "c", "title": "Café", "text": "crème"}\n'.encode("latin-1")
    elif case == "binary":
        data = bytes(range(256)) * 8
    elif case == "broken gzip":
        data = gzip.compress(GOOD_LINE.encode() * 1000)[:-40]
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty passage", "corpus.jsonl:2: passage 'e' has neither title nor text"),
        ("null text", "corpus.jsonl:2: expected a JSON object with id, title and text ('text' must be a string"),
        ("a 25k-character word", "corpus.jsonl:2: passage 'w' is 25000 characters; the limit is 20000"),
        ("a 2k-character title", "corpus.jsonl:2: passage 't' has a 2000-character title; the limit is 1000"),
        ("latin-1", "corpus.jsonl:2: not UTF-8 text (invalid continuation byte at byte 25)"),
        ("binary", "corpus.jsonl:1: expected a JSON object with id, title and text"),
        ("broken gzip", "is it a whole gzip file?"),
        ("not gzip", "is it a whole gzip file?"),
        ("passage words 0", "--passage-words must be at least 1, got 0"),
        ("directory", "is a directory; give a .jsonl or .tsv file"),
        ("device", "/dev/zero is not a regular file (a device, FIFO or socket)"),
        ("fifo", "corpus.jsonl is not a regular file (a device, FIFO or socket)"),
    ],
)
def test_index_build_refuses_what_no_generator_reads_by_line_and_writes_nothing(
    tmp_path: Path, tiny: TinyModels, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    corpus = _bad_corpus(tmp_path, case)
    root = tmp_path / "indexes"
    extra = ["--passage-words", "0", "--no-progress"] if case == "passage words 0" else []
    assert rag_cli(index_build_args(corpus, root, "bad", tiny.encoder_spec, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (root / "bad").exists() or list((root / "bad").iterdir()) == []


def test_a_build_removes_what_killed_builds_left_and_keeps_a_live_builds(
    tmp_path: Path, tiny: TinyModels, corpus: Path
) -> None:
    root = tmp_path / "indexes"
    (root / "wiki").mkdir(parents=True)
    killed, live = root / "wiki" / ".tmp-killed", root / "wiki" / ".tmp-live"
    for directory in (killed, live):
        (directory / "shard-0").mkdir(parents=True)
        directory.with_name(directory.name + ".lock").touch()
    with (live.with_name(live.name + ".lock")).open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a build still running, in another process or thread
        build(corpus, root, "wiki", tiny.encoder_spec)
        left = sorted(p.name for p in (root / "wiki").iterdir())
    assert left == [".tmp-live", ".tmp-live.lock", "v1"]


def test_exact_search_equals_faiss_flat_index(services: Services, index_root: Path) -> None:
    reply = search(services.retriever, QUESTIONS, 10, include_embeddings=True, include_query_embeddings=True)
    assert reply.index_version == "tiny@v1"
    embeddings = np.load(index_root / "tiny" / "v1" / "shard-0" / "embeddings.npy")
    brute = faiss.IndexFlatIP(embeddings.shape[1])
    brute.add(embeddings)
    queries = np.array([list(r.query_embedding) for r in reply.results], dtype=np.float32)
    scores, rows = brute.search(queries, 10)
    ids = passage_ids(index_root / "tiny" / "v1" / "shard-0")
    for result, expected_rows, expected_scores in zip(reply.results, rows, scores, strict=True):
        assert [p.id for p in result.passages] == [ids[r] for r in expected_rows]
        np.testing.assert_allclose([p.score for p in result.passages], expected_scores, rtol=1e-5, atol=1e-6)
        for p in result.passages:  # the returned embedding is the indexed one, and score = q . d
            np.testing.assert_allclose(p.embedding, embeddings[ids.index(p.id)], rtol=1e-6)


def test_duplicate_passages_come_back_in_corpus_order(tmp_path: Path, tiny: TinyModels, launch: Launcher) -> None:
    # Real corpora repeat passages (mirrors, templates); equal scores must rank the same way every time.
    copies = [dict(FACTS[0], id=f"copy{i}") for i in range(12)]
    records = corpus_records()[:20] + copies
    corpus = write_jsonl(tmp_path / "copies.jsonl", records)
    same_text = [r["id"] for r in records if r["text"] == FACTS[0]["text"]]  # the original, then the copies
    build(corpus, tmp_path / "indexes", "copies", tiny.encoder_spec)
    served = launch.retriever(tmp_path / "indexes", index="copies")
    for k in (3, 8):
        (result,) = search(address(served), [FACTS[0]["text"]], k).results
        assert [p.id for p in result.passages] == same_text[:k]


@pytest.mark.parametrize(("block", "k"), [(7, 5), (64, 10), (1000, 1), (5000, 20)])
def test_blockwise_exact_search_equals_faiss(block: int, k: int) -> None:
    # The retriever scans big indexes in row blocks; small blocks exercise the merging across them.
    from retriever_svc.search import exact_top_k

    rng = np.random.default_rng(block)
    embeddings = rng.standard_normal((3000, 16), dtype=np.float32)
    embeddings[1000:1010] = embeddings[5]  # exact ties across blocks
    queries = np.concatenate([rng.standard_normal((6, 16), dtype=np.float32), embeddings[5:6]])
    brute = faiss.IndexFlatIP(16)
    brute.add(embeddings)
    scores, rows = brute.search(queries, k)
    for hits, expected_rows, expected_scores, query in zip(
        exact_top_k(embeddings, queries, k, block), rows, scores, queries, strict=True
    ):
        np.testing.assert_allclose([h.score for h in hits], expected_scores, rtol=1e-5)
        exact = embeddings @ query
        assert [h.row for h in hits] == sorted(range(len(exact)), key=lambda r: (-exact[r], r))[:k]
        assert len({h.row for h in hits} ^ set(expected_rows.tolist())) <= 2 * sum(
            exact[r] == exact[5] for r in expected_rows
        )  # faiss agrees except on the order it picks among exact ties


def _recall(approximate: retriever_pb2.SearchResponse, exact: retriever_pb2.SearchResponse) -> float:
    hits = [
        len({p.id for p in a.passages} & {p.id for p in e.passages}) / len(e.passages)
        for a, e in zip(approximate.results, exact.results, strict=True)
    ]
    return sum(hits) / len(hits)


def test_hnsw_and_ivfpq_indexes_search_close_to_exact(tmp_path: Path, tiny: TinyModels, launch: Launcher) -> None:
    records = [
        {"id": f"p{i}", "title": f"Entry {i}", "text": f"entry {i} mentions {i * 7919 % 1000} and {i % 97} things"}
        for i in range(10_000)
    ]
    corpus = write_jsonl(tmp_path / "big.jsonl", records)
    root = tmp_path / "indexes"
    questions = [f"which entry mentions {n} things?" for n in range(0, 1000, 50)]
    replies = {}
    for index_type in ("flat", "hnsw", "ivfpq"):
        args = index_build_args(
            corpus, root, index_type, tiny.encoder_spec, "--index-type", index_type, "--no-progress"
        )
        assert rag_cli(args) == 0
        served = launch.retriever(root, index=index_type, mmap=index_type != "flat")  # mmap the faiss files
        replies[index_type] = search(
            address(served), questions, 10, include_embeddings=True, include_query_embeddings=True
        )
    assert Manifest.from_file(root / "ivfpq" / "v1" / "manifest.json").faiss_factory.startswith("IVF")
    assert _recall(replies["hnsw"], replies["flat"]) >= 0.9
    assert _recall(replies["ivfpq"], replies["flat"]) >= 0.5
    for result in replies["ivfpq"].results:  # approximate candidates, exact scores, best first
        q = np.array(result.query_embedding)
        scores = [p.score for p in result.passages]
        np.testing.assert_allclose(scores, [q @ np.array(p.embedding) for p in result.passages], rtol=1e-4, atol=1e-5)
        assert scores == sorted(scores, reverse=True)


def test_ivfpq_on_a_small_corpus_is_refused_with_a_reason(tmp_path: Path, tiny: TinyModels, corpus: Path) -> None:
    with pytest.raises(InvalidArgument, match="ivfpq needs at least"):
        build_index(corpus, "jsonl", tmp_path, "small", load_encoder(tiny.encoder_spec), "ivfpq", show_progress=False)


def test_dpr_encoders_build_and_serve_an_index(
    tmp_path: Path, tiny: TinyModels, corpus: Path, launch: Launcher
) -> None:
    spec = f"dpr:question={tiny.dpr_question},context={tiny.dpr_context}"
    root = tmp_path / "indexes"
    assert rag_cli(index_build_args(corpus, root, "dpr", spec)) == 0
    manifest = Manifest.from_file(root / "dpr" / "v1" / "manifest.json")
    assert manifest.encoder.kind == "dpr" and manifest.encoder.score_temperature == 1.0
    assert manifest.encoder.question_identity != manifest.encoder.passage_identity  # two towers
    served = launch.retriever(root, index="dpr")
    reply = search(address(served), QUESTIONS[:1], 5, include_embeddings=True, include_query_embeddings=True)
    assert reply.score_temperature == 1.0
    result = reply.results[0]
    q = np.array(result.query_embedding)
    np.testing.assert_allclose(
        [p.score for p in result.passages], [q @ np.array(p.embedding) for p in result.passages], rtol=1e-4
    )
    assert abs(np.linalg.norm(q) - 1.0) > 1e-3  # DPR vectors are not normalised


def test_retriever_refuses_an_index_built_by_another_encoder(
    tmp_path: Path, tiny: TinyModels, index_root: Path, launch: Launcher
) -> None:
    other = tmp_path / "other-encoder"
    from rag_cli.testing.random_models import save_sentence_encoder

    save_sentence_encoder(other, seed=1)
    served = launch.retriever(index_root, index="tiny", encoder=f"sentence-transformer:{other}")
    assert served.loading is not None and "built with a different encoder" in str(served.loading.exception())
    with pytest.raises(grpc.RpcError) as err:
        search(address(served), QUESTIONS, 3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("questions", "k", "message"),
    [
        ([], 3, "no questions"),
        ([""], 3, "question is empty"),
        (["x" * 5000], 3, "characters; the limit is"),
        (["fine"], 0, "k must be in"),
        (["fine"], 1000, "k must be in"),
    ],
)
def test_search_rejects_bad_requests(services: Services, questions: list[str], k: int, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        search(services.retriever, questions, k)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(err.value)


def test_search_serves_several_questions_in_one_call(services: Services) -> None:
    reply = search(services.retriever, QUESTIONS, 4)
    assert len(reply.results) == 3 and all(len(r.passages) == 4 for r in reply.results)
    assert reply.score_temperature == pytest.approx(0.05)
    for result in reply.results:
        assert not result.passages[0].embedding and not result.query_embedding  # only when asked for
        assert len({p.id for p in result.passages}) == 4  # four distinct passages, not one repeated


def test_index_type_may_be_a_faiss_factory_string(tmp_path: Path, tiny: TinyModels, corpus: Path) -> None:
    encoder = load_encoder(tiny.encoder_spec)
    manifest = build_index(corpus, "jsonl", tmp_path, "custom", encoder, "HNSW16,Flat", show_progress=False)
    assert manifest.faiss_factory == "HNSW16,Flat"
    with pytest.raises(InvalidArgument, match="neither flat, hnsw, ivfpq nor a faiss factory string"):
        build_index(corpus, "jsonl", tmp_path, "bogus", encoder, "NotAnIndex42", show_progress=False)


def test_a_huge_name_is_refused_as_invalid_with_a_bounded_message(services: Services) -> None:
    # Issue 18, item 8: the message quoted all 100k characters; the trailers overflowed into RESOURCE_EXHAUSTED.
    with pytest.raises(grpc.RpcError) as err:
        search(services.retriever, ["Who discovered penicillin?"], 3, index_version="x" * 100_000 + "@v1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = err.value.details() or ""
    assert message.startswith("index name 'xxx") and "characters cut" in message and len(message) <= 2000
