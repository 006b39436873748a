"""Index lifecycle through gRPC: versioned, sharded builds; swaps that update what the system knows with no
failed request and no answer mixing versions; refusal of corrupt or mismatched versions; admin security."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.config import GatewayConfig
from gateway.server import create_server as create_gateway
from generator_svc.config import GeneratorConfig
from generator_svc.server import create_server as create_generator
from rag.auth import bearer
from rag.random_models import save_sentence_encoder
from rag.serving import Served, ServerThread
from rag.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    index_admin_pb2,
    index_admin_pb2_grpc,
)
from retriever_svc.config import RetrieverConfig
from retriever_svc.encoders import load_encoder
from retriever_svc.index import build_index
from retriever_svc.server import create_server as create_retriever
from tests.conftest import TinyModels, corpus_records, local, passage_ids, write_jsonl

TOKEN = "test-admin-token"
QUESTION = "Who is the president of Examplia?"
FACT = {
    "v1": "The president of Examplia is Alice Smith, elected in 2016.",
    "v2": "The president of Examplia is Bob Jones, elected in 2018.",
}


def versioned_corpus(tmp: Path, version: str) -> Path:
    """The same documents in each version except the fact; ids carry the version, so every passage in an
    answer says which version it came from."""
    records = [{"id": f"{version}-president", "title": "Examplia", "text": FACT[version]}]
    records += [dict(r, id=f"{version}-{r['id']}") for r in corpus_records(60)]
    return write_jsonl(tmp / f"corpus-{version}.jsonl", records)


@dataclass
class Cluster:
    gateway: str
    retrievers: list[Served]
    served: list[Served]

    def ask(self, k: int = 4, timeout: float = 60) -> gateway_pb2.AskResponse:
        with grpc.insecure_channel(self.gateway) as channel:
            return gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
                gateway_pb2.AskRequest(question=QUESTION, k=k, options=generator_pb2.DecodingOptions(max_new_tokens=3)),
                timeout=timeout,
            )

    def admin(self, rpc: str, request: object, token: str | None = TOKEN) -> object:
        with grpc.insecure_channel(self.gateway) as channel:
            metadata = bearer(token) if token is not None else ()
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), rpc)(request, timeout=120, metadata=metadata)

    def swap(self, version: str, name: str = "") -> admin_pb2.SwapIndexResponse:
        return self.admin("SwapIndex", admin_pb2.SwapIndexRequest(name=name, version=version))  # type: ignore[return-value]

    def status(self) -> list:  # type: ignore[type-arg]
        return list(self.admin("ListIndexStatus", admin_pb2.ListIndexStatusRequest()).retrievers)  # type: ignore[attr-defined]


def launch(thread: ServerThread, tiny: TinyModels, root: Path, index: str, shards: int) -> Cluster:
    common = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
    retrievers = [
        thread.start(
            create_retriever,
            RetrieverConfig(**common, index_root=str(root), index=index, shard=s, admin_token=TOKEN),
        )
        for s in range(shards)
    ]
    generator = thread.start(create_generator, GeneratorConfig(**common, generator=str(tiny.rag_checkpoint)))
    gateway = thread.start(
        create_gateway,
        GatewayConfig(
            **common,
            retrievers=",".join(local(r.port) for r in retrievers),
            generator_address=local(generator.port),
            admin_token=TOKEN,
        ),
    )
    return Cluster(local(gateway.port), retrievers, [gateway, generator, *retrievers])


@pytest.fixture()
def cluster_factory(loop_thread: ServerThread, tiny: TinyModels) -> Iterator:  # type: ignore[type-arg]
    clusters: list[Cluster] = []

    def make(root: Path, index: str, shards: int = 1) -> Cluster:
        clusters.append(launch(loop_thread, tiny, root, index, shards))
        return clusters[-1]

    yield make
    for cluster in clusters:
        for served in cluster.served:
            loop_thread.run(served.stop(0))


def build(root: Path, tmp: Path, tiny: TinyModels, version: str, shards: int = 1, name: str = "kb") -> str:
    return build_index(
        versioned_corpus(tmp, version),
        "jsonl",
        root,
        name,
        load_encoder(tiny.encoder_spec),
        shards=shards,
        show_progress=False,
    ).version


def retriever_admin(served: Served, rpc: str, request: object) -> object:
    with grpc.insecure_channel(local(served.port)) as channel:
        return getattr(index_admin_pb2_grpc.IndexAdminServiceStub(channel), rpc)(
            request, timeout=60, metadata=bearer(TOKEN)
        )


def version_of(passage_id: str) -> str:
    return passage_id.split("-", 1)[0]


# ------------------------------------------------------------------------------------------------ swaps


def test_a_swap_updates_knowledge_and_a_swap_back_restores_it(
    tmp_path: Path, tiny: TinyModels, cluster_factory
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "indexes"
    assert build(root, tmp_path, tiny, "v1") == "v1" and build(root, tmp_path, tiny, "v2") == "v2"
    cluster = cluster_factory(root, "kb@v1")
    before = cluster.ask(k=1)
    assert before.index_version == "kb@v1" and before.sources[0].passage.text == FACT["v1"]

    reply = cluster.swap("v2")
    assert (reply.index_version, reply.previous_version, reply.retrievers) == ("kb@v2", "kb@v1", 1)
    after = cluster.ask(k=1)
    assert after.index_version == "kb@v2" and after.sources[0].passage.text == FACT["v2"]
    answer = lambda reply: (reply.answers[0].text, round(reply.answers[0].log_prob, 4))  # noqa: E731
    assert answer(after) != answer(before)  # the generator read the new passage
    [status] = cluster.status()  # the old version was released once the swap was complete
    assert (status.active_version, status.previous_version, status.staged_version) == ("kb@v2", "", "")
    assert set(status.in_flight) == {"kb@v2"}

    assert cluster.swap("v1").previous_version == "kb@v2"  # rollback
    restored = cluster.ask(k=1)
    assert restored.index_version == "kb@v1" and answer(restored) == answer(before)


def test_no_request_fails_or_mixes_versions_through_20_swaps_of_2_shards(
    tmp_path: Path, tiny: TinyModels, cluster_factory
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "indexes"
    build(root, tmp_path, tiny, "v1", shards=2)
    build(root, tmp_path, tiny, "v2", shards=2)
    cluster = cluster_factory(root, "kb@v1", shards=2)
    stop = threading.Event()
    served: list[str] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                reply = cluster.ask(k=6)
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()}")
                continue
            version = reply.index_version.partition("@")[2]
            mixed = [s.passage.id for s in reply.sources if version_of(s.passage.id) != version]
            if mixed:
                failures.append(f"{reply.index_version} answer holds passages {mixed}")
            served.append(version)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        for i in range(20):
            cluster.swap("v2" if i % 2 == 0 else "v1")
            seen = len(served)
            while len(served) < seen + 4 and not failures:  # let answers from this version through before the next swap
                stop.wait(0.01)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert failures == []
    assert len(served) >= 80 and {"v1", "v2"} <= set(served)
    print(f"\n{len(served)} requests served during 20 swaps of 2 shards")


def test_answers_stay_on_one_version_while_shards_disagree(tmp_path: Path, tiny: TinyModels, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """Freeze a swap halfway (shard 0 activated, shard 1 not) by driving the retrievers directly: every answer
    must still come from one version on both shards."""
    root = tmp_path / "indexes"
    build(root, tmp_path, tiny, "v1", shards=2)
    build(root, tmp_path, tiny, "v2", shards=2)
    cluster = cluster_factory(root, "kb@v1", shards=2)

    for served in cluster.retrievers:
        retriever_admin(served, "LoadIndex", index_admin_pb2.LoadIndexRequest(index_version="kb@v2"))
    retriever_admin(cluster.retrievers[0], "ActivateIndex", index_admin_pb2.ActivateIndexRequest(index_version="kb@v2"))
    for _ in range(5):
        reply = cluster.ask(k=20)
        version = reply.index_version.partition("@")[2]
        ids = {s.passage.id for s in reply.sources}
        assert {version_of(i) for i in ids} == {version}
        assert all(
            ids & set(passage_ids(root / "kb" / version / f"shard-{shard}")) for shard in (0, 1)
        )  # both shards answered


def test_sharded_exact_search_returns_the_unsharded_top_k(tmp_path: Path, tiny: TinyModels, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    one, three = tmp_path / "one", tmp_path / "three"
    corpus = versioned_corpus(tmp_path, "v1")
    encoder = load_encoder(tiny.encoder_spec)
    build_index(corpus, "jsonl", one, "kb", encoder, shards=1, show_progress=False)
    manifest = build_index(corpus, "jsonl", three, "kb", encoder, shards=3, show_progress=False)
    assert manifest.num_shards == 3 and sum(manifest.shard_counts) == manifest.count
    unsharded, sharded = cluster_factory(one, "kb"), cluster_factory(three, "kb", shards=3)
    for k in (1, 7, 20):
        a, b = unsharded.ask(k=k), sharded.ask(k=k)
        assert [s.passage.id for s in b.sources] == [s.passage.id for s in a.sources]
        assert [s.passage.score for s in b.sources] == pytest.approx([s.passage.score for s in a.sources], abs=1e-6)


def test_rebuilding_reuses_unchanged_embeddings_exactly(tmp_path: Path, tiny: TinyModels) -> None:
    root = tmp_path / "indexes"
    encoder = load_encoder(tiny.encoder_spec)
    build_index(versioned_corpus(tmp_path, "v1"), "jsonl", root, "kb", encoder, show_progress=False)
    corpus = versioned_corpus(tmp_path, "v2")
    reused = build_index(corpus, "jsonl", root, "kb", encoder, show_progress=False)
    fresh = build_index(corpus, "jsonl", root, "fresh", encoder, reuse_embeddings=False, show_progress=False)
    borrowed = build_index(corpus, "jsonl", root, "other", encoder, reuse_from="kb@v1", show_progress=False)
    a, b, c = (np.load(root / m.name / m.version / "shard-0" / "embeddings.npy") for m in (reused, fresh, borrowed))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(c, b, atol=1e-6)
    assert reused.embeddings_reused == {"from": "kb@v1", "passages": reused.count - 1}  # all but the changed fact
    assert borrowed.embeddings_reused == {"from": "kb@v1", "passages": reused.count - 1} and not fresh.embeddings_reused


# ------------------------------------------------------------------------------------------------ refusals


def _copy_version(root: Path, source: str, target: str, name: str = "kb") -> Path:
    """A copy published as another version (its manifest says so), to be damaged by the test."""
    shutil.copytree(root / name / source, root / name / target)
    _edit_manifest(root / name / target, version=target)
    return root / name / target


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path, **changes: object) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_or_mismatched_versions_are_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, tiny: TinyModels, cluster_factory
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "indexes"
    build(root, tmp_path, tiny, "v1")
    serving_encoder = load_encoder(tiny.encoder_spec).info

    _truncate(_copy_version(root, "v1", "v2") / "shard-0" / "embeddings.npy")
    _flip_a_byte(_copy_version(root, "v1", "v3") / "shard-0" / "passages.sqlite")
    (_copy_version(root, "v1", "v4") / "manifest.json").unlink()
    other = save_sentence_encoder(tmp_path / "other-encoder", seed=7)  # same dimension, other weights
    build_index(
        versioned_corpus(tmp_path, "v2"),
        "jsonl",
        root,
        "kb",
        load_encoder(f"sentence-transformer:{other}"),
        show_progress=False,
    )  # v5
    narrow = save_sentence_encoder(tmp_path / "narrow-encoder", hidden=16)
    build_index(
        versioned_corpus(tmp_path, "v2"),
        "jsonl",
        root,
        "kb",
        load_encoder(f"sentence-transformer:{narrow}"),
        show_progress=False,
    )  # v6
    _edit_manifest(
        root / "kb" / "v6", encoder=dict(serving_encoder.to_json(), dim=16)
    )  # claims our encoder, holds 16-d vectors

    shutil.copytree(root / "kb" / "v1", root / "kb" / "v7")  # an unedited copy: its manifest says v1
    cluster = cluster_factory(root, "kb@v1")
    expected = {
        "v2": "checksum mismatch for shard-0/embeddings.npy",
        "v3": "checksum mismatch for shard-0/passages.sqlite",
        "v4": "has no manifest.json",
        "v5": "was built with a different encoder",
        "v6": "has dimension 16; the encoder produces 32",
        "v7": "holds a manifest for kb@v1",
        "v99": "has no version 'v99'",
    }
    for version, reason in expected.items():
        with pytest.raises(grpc.RpcError) as err:
            cluster.swap(version)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), version
        assert reason in err.value.details() and "every retriever still serves kb@v1" in err.value.details(), (
            err.value.details()
        )
        assert cluster.ask(k=1).index_version == "kb@v1"
        [status] = cluster.status()
        assert (status.active_version, status.staged_version) == ("kb@v1", "")


def test_admin_rpcs_need_the_token_and_stay_inside_the_index_root(
    tmp_path: Path, tiny: TinyModels, cluster_factory
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "indexes"
    build(root, tmp_path, tiny, "v1")
    build(root, tmp_path, tiny, "v2")
    cluster = cluster_factory(root, "kb@v1")
    swap = admin_pb2.SwapIndexRequest(version="v2")
    for token, message in ((None, "need `authorization: Bearer <token>`"), ("wrong", "not valid")):
        with pytest.raises(grpc.RpcError) as err:
            cluster.admin("SwapIndex", swap, token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in err.value.details()
    for request in (
        admin_pb2.SwapIndexRequest(version="../v2"),
        admin_pb2.SwapIndexRequest(version="/etc/passwd"),
        admin_pb2.SwapIndexRequest(name="../../etc", version="v1"),
        admin_pb2.SwapIndexRequest(name="kb/..", version="v1"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            cluster.admin("SwapIndex", request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    assert cluster.ask(k=1).index_version == "kb@v1"


def test_a_retriever_holds_at_most_two_versions(tmp_path: Path, tiny: TinyModels, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """Driving one retriever directly: loading a third version evicts the other inactive one first."""
    root = tmp_path / "indexes"
    for version in ("v1", "v2", "v1"):
        build(root, tmp_path, tiny, version)  # kb v1, v2, v3
    cluster = cluster_factory(root, "kb@v1")
    [retriever] = cluster.retrievers
    retriever_admin(retriever, "LoadIndex", index_admin_pb2.LoadIndexRequest(index_version="kb@v2"))
    retriever_admin(retriever, "ActivateIndex", index_admin_pb2.ActivateIndexRequest(index_version="kb@v2"))
    [status] = cluster.status()
    assert (status.active_version, status.previous_version, set(status.in_flight)) == (
        "kb@v2",
        "kb@v1",
        {"kb@v1", "kb@v2"},
    )
    retriever_admin(retriever, "LoadIndex", index_admin_pb2.LoadIndexRequest(index_version="kb@v3"))
    [status] = cluster.status()
    assert (status.active_version, status.staged_version, set(status.in_flight)) == (
        "kb@v2",
        "kb@v3",
        {"kb@v2", "kb@v3"},
    )
    with pytest.raises(grpc.RpcError) as err:
        retriever_admin(retriever, "UnloadIndex", index_admin_pb2.UnloadIndexRequest(index_version="kb@v2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is active" in err.value.details()


def test_swaps_and_refused_loads_are_counted(tmp_path: Path, tiny: TinyModels, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    def value(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    root = tmp_path / "indexes"
    build(root, tmp_path, tiny, "v1", name="metered")
    build(root, tmp_path, tiny, "v2", name="metered")
    _flip_a_byte(_copy_version(root, "v2", "v3", name="metered") / "shard-0" / "embeddings.npy")
    cluster = cluster_factory(root, "metered@v1")
    swapped, failed = (
        value("rag_index_swaps_total", outcome="swapped"),
        value("rag_index_swaps_total", outcome="failed"),
    )
    checksum_failures = value("rag_index_load_failures_total", reason="checksum")

    cluster.swap("v2")
    with pytest.raises(grpc.RpcError):
        cluster.swap("v3")
    assert value("rag_index_swaps_total", outcome="swapped") == swapped + 1
    assert value("rag_index_swaps_total", outcome="failed") == failed + 1
    assert value("rag_index_swap_duration_seconds_count", outcome="swapped") >= 1
    assert value("rag_index_load_failures_total", reason="checksum") == checksum_failures + 1
    assert value("rag_index_info", name="metered", version="v2") == 1
    assert REGISTRY.get_sample_value("rag_index_info", {"name": "metered", "version": "v1"}) is None
