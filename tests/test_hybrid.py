"""Hybrid retrieval through gRPC and the CLI: a lexical (BM25) index beside the dense one, three retrieval modes,
fusion that is also the prior, the same results from 1 shard or 3, both indexes swapped as one version, and
refusals that say what to do."""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import bm25s
import grpc
import numpy as np
import pytest

from rag import metrics
from rag.errors import ResourceExhausted
from rag.fusion import RRF_TEMPERATURE
from rag.v1 import gateway_pb2, gateway_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from rag_cli.testing.stack import Launcher, address
from retriever_svc import lexical
from retriever_svc.build import build_index
from retriever_svc.encoders import load_encoder
from retriever_svc.layout import Manifest, versions
from retriever_svc.search import IndexShard
from tests.conftest import TinyModels, build, corpus_records, details, rag, write_jsonl

DENSE, LEXICAL, HYBRID = (
    retriever_pb2.RETRIEVAL_MODE_DENSE,
    retriever_pb2.RETRIEVAL_MODE_LEXICAL,
    retriever_pb2.RETRIEVAL_MODE_HYBRID,
)
QUESTION = "Who discovered penicillin?"  # the tiny random encoder cannot find it; its words can
NO_TERMS = ["the of and is it", "🙂🚀🎉", "日本語の質問です"]  # stop words, emoji, another script


def search(target: str, questions: list[str], k: int, mode: int, **fields: Any) -> retriever_pb2.SearchResponse:
    """`mode` is a RetrievalMode number, known or not (the server must refuse unknown ones)."""
    request = retriever_pb2.SearchRequest(questions=questions, k=k, **fields)
    request.retrieval = mode  # type: ignore[assignment]
    with grpc.insecure_channel(target) as channel:
        return retriever_pb2_grpc.RetrieverServiceStub(channel).Search(request, timeout=60)


def ask(gateway: str, question: str, k: int, mode: int = 0, **fields: Any) -> gateway_pb2.AskResponse:
    request = gateway_pb2.AskRequest(question=question, k=k, **fields)
    request.retrieval = mode  # type: ignore[assignment]
    with grpc.insecure_channel(gateway) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Ask(request, timeout=120)


def ranked(reply: gateway_pb2.AskResponse) -> list[tuple[str, float, float, float]]:
    return [(s.passage.id, s.passage.score, s.passage.dense_score, s.passage.lexical_score) for s in reply.sources]


@pytest.fixture(scope="module")
def hybrid_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hybrid") / "corpus.jsonl", corpus_records(60))


@pytest.fixture(scope="module")
def hybrid_root(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModels, hybrid_corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("hybrid-indexes")
    build(hybrid_corpus, root, "one", tiny.encoder_spec)
    build(hybrid_corpus, root, "three", tiny.encoder_spec, shards=3)
    build(hybrid_corpus, root, "plain", tiny.encoder_spec, lexical=False)
    return root


def test_lexical_scores_are_bm25s_own(hybrid_root: Path) -> None:
    # One shard holds the whole corpus: our index must score as bm25s indexing the same terms itself.
    shard = IndexShard(hybrid_root / "one" / "v1", 0)
    assert shard.lexical is not None
    analyzer = lexical.Analyzer()
    with sqlite3.connect(hybrid_root / "one" / "v1" / "shard-0" / "passages.sqlite") as store:
        texts = [f"{title}\n{text}" for title, text in store.execute("SELECT title, text FROM passages ORDER BY row")]
    reference = bm25s.BM25(method="lucene", k1=lexical.K1, b=lexical.B)
    reference.index([analyzer.terms(t) for t in texts], show_progress=False)
    for question in (QUESTION, "highest mountain of the Earth", "Topic 7 sentence"):
        terms = analyzer.terms(question)
        ours = shard.lexical.bm25.get_scores(terms)
        np.testing.assert_allclose(ours, reference.get_scores(terms), rtol=1e-5, atol=1e-6)
    shard.close()


def test_three_modes_score_and_fuse_as_documented(launch: Launcher, hybrid_root: Path, tiny: TinyModels) -> None:
    served = address(launch.retriever(hybrid_root, "one", fusion_weight=20.0))
    dense = search(served, [QUESTION], 30, DENSE).results[0].passages
    assert all(p.HasField("dense_score") and not p.HasField("lexical_score") for p in dense)
    assert [p.score for p in dense] == [p.dense_score for p in dense]
    assert dense[0].id != "fleming"  # random embeddings: the dense list misses the fact

    reply = search(served, [QUESTION], 5, LEXICAL)
    assert reply.retrieval == LEXICAL and reply.score_temperature == pytest.approx(1 / 20.0)
    found = reply.results[0].passages
    assert [p.id for p in found] == ["fleming"]  # the only passage holding "discovered" or "penicillin"
    assert found[0].lexical_score == found[0].score and 0 < found[0].score < 1
    assert not found[0].HasField("dense_score")

    reply = search(served, [QUESTION], 5, HYBRID)
    assert reply.retrieval == HYBRID and reply.score_temperature == 1.0
    fusion = reply.fusion
    assert fusion.method == retriever_pb2.FUSION_METHOD_LINEAR and fusion.weight == 20.0
    hybrid = reply.results[0].passages
    assert hybrid[0].id == "fleming"  # the lexical match, fused in first
    for p in hybrid:  # score = dense / T + weight * lexical, ranked by it
        assert p.score == pytest.approx(p.dense_score / fusion.dense_temperature + 20.0 * p.lexical_score, rel=1e-5)
    assert [p.score for p in hybrid] == sorted((p.score for p in hybrid), reverse=True)
    assert {p.id for p in hybrid[1:]} <= {p.id for p in dense}

    # The gateway hands the fused score and its temperature to the generator: the prior is softmax(score).
    generator = launch.generator(tiny.rag_checkpoint)
    gateway = address(launch.gateway(served, address(generator)))
    answer = ask(gateway, QUESTION, 3, HYBRID, options={"max_new_tokens": 2})
    assert answer.retrieval == HYBRID and answer.sources[0].passage.id == "fleming"
    scores = np.array([s.passage.score for s in answer.sources])
    expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    np.testing.assert_allclose([s.prior for s in answer.sources], expected, rtol=1e-4)


def test_rrf_fuses_the_ranks_of_both_lists(launch: Launcher, hybrid_root: Path) -> None:
    served = address(launch.retriever(hybrid_root, "one", fusion="rrf", fusion_candidates=10))
    dense = [p.id for p in search(served, [QUESTION], 10, DENSE).results[0].passages]
    lexical_ids = [p.id for p in search(served, [QUESTION], 10, LEXICAL).results[0].passages]
    reply = search(served, [QUESTION], 5, HYBRID)
    assert reply.score_temperature == pytest.approx(RRF_TEMPERATURE)
    for p in reply.results[0].passages:
        expected = sum(1 / (60 + ids.index(p.id) + 1) for ids in (dense, lexical_ids) if p.id in ids)
        assert p.score == pytest.approx(expected, rel=1e-6)
    assert reply.results[0].passages[0].id in (dense[0], "fleming")


@pytest.mark.parametrize("fusion", ["linear", "rrf"])
def test_one_shard_and_three_shards_return_the_same_passages_and_scores(
    launch: Launcher, hybrid_root: Path, fusion: str
) -> None:
    gateways = []
    for name, shards in (("one", 1), ("three", 3)):
        retrievers = [
            address(launch.retriever(hybrid_root, name, shard=s, fusion=fusion, fusion_candidates=4))
            for s in range(shards)
        ]
        gateways.append(address(launch.gateway(",".join(retrievers), "127.0.0.1:9")))  # retrieval only
    questions = [QUESTION, "Topic 12 is described in sentence 3", "capital city of France", "mountain Earth level"]
    for question in questions:
        for mode in (DENSE, LEXICAL, HYBRID):
            one, three = (ranked(ask(g, question, 6, mode, retrieve_only=True)) for g in gateways)
            assert [p[0] for p in one] == [p[0] for p in three], (question, mode)
            np.testing.assert_allclose([p[1:] for p in one], [p[1:] for p in three], rtol=1e-5, atol=1e-6)


def test_a_question_without_lexical_terms(launch: Launcher, hybrid_root: Path) -> None:
    served = address(launch.retriever(hybrid_root, "one"))
    gateway = address(launch.gateway(served, "127.0.0.1:9"))
    for question in NO_TERMS:
        assert list(search(served, [question], 5, LEXICAL).results[0].passages) == []
        dense = [p.id for p in search(served, [question], 5, DENSE).results[0].passages]
        hybrid = search(served, [question], 5, HYBRID).results[0].passages
        assert [p.id for p in hybrid] == dense and all(p.lexical_score == 0 for p in hybrid)  # served dense
        assert ask(gateway, question, 5, LEXICAL, retrieve_only=True).sources == []
        with pytest.raises(grpc.RpcError) as err:
            ask(gateway, question, 5, LEXICAL)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "hybrid or dense" in details(err.value)


def test_the_gateway_default_mode_applies_to_asks_that_name_none(launch: Launcher, hybrid_root: Path) -> None:
    served = address(launch.retriever(hybrid_root, "one", retrieval="dense"))
    assert search(served, [QUESTION], 3, 0).retrieval == DENSE  # the retriever's own default
    gateway = address(launch.gateway(served, "127.0.0.1:9", retrieval="lexical"))
    reply = ask(gateway, QUESTION, 3, retrieve_only=True)
    assert reply.retrieval == LEXICAL and [s.passage.id for s in reply.sources] == ["fleming"]
    assert ask(gateway, QUESTION, 3, HYBRID, retrieve_only=True).retrieval == HYBRID  # the request wins


def test_bad_modes_and_versions_without_a_lexical_index_are_refused(launch: Launcher, hybrid_root: Path) -> None:
    served = address(launch.retriever(hybrid_root, "plain"))  # server default hybrid: served dense here
    assert search(served, [QUESTION], 3, 0).retrieval == DENSE
    gateway = address(launch.gateway(served, "127.0.0.1:9"))
    for call in (lambda m: search(served, [QUESTION], 3, m), lambda m: ask(gateway, QUESTION, 3, m)):
        with pytest.raises(grpc.RpcError) as err:
            call(7)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "RETRIEVAL_MODE_HYBRID" in details(err.value)
        for mode in (LEXICAL, HYBRID):
            with pytest.raises(grpc.RpcError) as err:
                call(mode)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "plain@v1 has no lexical index" in details(err.value) and "rag index build" in details(err.value)


def test_the_swap_moves_both_indexes_together(launch: Launcher, tmp_path: Path, tiny: TinyModels) -> None:
    root, token = tmp_path / "indexes", "hybrid-admin-token-41b7e9c02d6a8f53"
    fact = {"id": "examplia", "title": "Examplia", "text": "The president of Examplia is Alice Smith."}
    build(write_jsonl(tmp_path / "v1.jsonl", corpus_records(30)), root, "kb", tiny.encoder_spec)
    build(write_jsonl(tmp_path / "v2.jsonl", [*corpus_records(30), fact]), root, "kb", tiny.encoder_spec)
    retriever = launch.retriever(root, "kb@v1", admin_token=token)
    gateway = address(launch.gateway(address(retriever), "127.0.0.1:9", admin_token=token))
    question = "Who is the president of Examplia?"
    assert "examplia" not in [s.passage.id for s in ask(gateway, question, 3, LEXICAL, retrieve_only=True).sources]
    assert (
        rag("index", "swap", "v2", "--name", "kb", "--gateway", gateway, env={"RAG_ADMIN_TOKEN": token}).returncode == 0
    )
    after = ask(gateway, question, 3, LEXICAL, retrieve_only=True)
    assert after.index_version == "kb@v2" and after.sources[0].passage.id == "examplia"
    # A corrupt lexical file is caught by the manifest's checksums: the swap fails, v2 keeps serving.
    v3 = build(write_jsonl(tmp_path / "v3.jsonl", corpus_records(31)), root, "kb", tiny.encoder_spec)
    (root / "kb" / v3.version / "shard-0" / "lexical" / "data.csc.index.npy").write_bytes(b"corrupt")
    swap = rag("index", "swap", v3.version, "--name", "kb", "--gateway", gateway, env={"RAG_ADMIN_TOKEN": token})
    assert swap.returncode == 1 and "checksum mismatch for shard-0/lexical/data.csc.index.npy" in swap.stderr
    assert ask(gateway, question, 3, LEXICAL, retrieve_only=True).index_version == "kb@v2"


def test_build_without_lexical_and_a_failed_lexical_build(
    tmp_path: Path, tiny: TinyModels, hybrid_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "indexes"
    result = rag("index", "build", "--corpus", str(hybrid_corpus), "--index-root", str(root), "--name", "kb",
                 "--encoder", tiny.encoder_spec, "--no-progress", "--no-lexical")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = Manifest.from_file(root / "kb" / "v1" / "manifest.json")
    assert manifest.lexical == {} and not (root / "kb" / "v1" / "shard-0" / "lexical").exists()
    listed = json.loads(rag("index", "list", "--index-root", str(root), "--json").stdout)
    assert listed[0]["lexical"] is None

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("retriever_svc.build.build_lexical", fail)
    with pytest.raises(ResourceExhausted, match=r"No space left on device.*nothing was published"):
        build_index(hybrid_corpus, "jsonl", root, "kb", load_encoder(tiny.encoder_spec), show_progress=False)
    assert versions(root, "kb") == ["v1"] and not [p for p in (root / "kb").iterdir() if p.name.startswith(".")]

    monkeypatch.undo()
    assert rag_build(hybrid_corpus, root, tiny).returncode == 0
    listed = json.loads(rag("index", "list", "--index-root", str(root), "--json").stdout)
    lexical_record = listed[-1]["lexical"]
    assert listed[-1]["index"] == "kb@v2" and lexical_record["bytes"] > 0 and lexical_record["build_seconds"] >= 0
    assert "built in" in rag("index", "list", "--index-root", str(root)).stdout


def rag_build(corpus: Path, root: Path, tiny: TinyModels) -> Any:
    return rag("index", "build", "--corpus", str(corpus), "--index-root", str(root), "--name", "kb",
               "--encoder", tiny.encoder_spec, "--no-progress")  # fmt: skip


def test_search_latency_is_counted_per_retrieval_mode(launch: Launcher, hybrid_root: Path) -> None:
    port = metrics.serve_metrics("127.0.0.1", 0, families=metrics.RETRIEVER)

    def searches(page: str, mode: str) -> float:
        match = re.search(rf'^rag_search_duration_seconds_count{{retrieval="{mode}"}} (\S+)$', page, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    served = address(launch.retriever(hybrid_root, "one"))
    before = scrape()
    for mode, times in ((DENSE, 1), (LEXICAL, 2), (HYBRID, 3)):
        for _ in range(times):
            search(served, [QUESTION], 3, mode)
    after = scrape()
    for name, times in (("dense", 1), ("lexical", 2), ("hybrid", 3)):
        assert searches(after, name) - searches(before, name) == times
