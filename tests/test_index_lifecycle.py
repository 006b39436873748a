"""Index lifecycle through gRPC: versioned, sharded builds; swaps that update what the system knows with no
failed request and no answer mixing versions; refusal of corrupt or mismatched versions; admin security."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from rag.auth import bearer
from rag.errors import FailedPrecondition
from rag.index_ref import IndexRef
from rag.serving import Served
from rag.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    index_admin_pb2,
    index_admin_pb2_grpc,
)
from rag_cli.testing.random_models import save_sentence_encoder
from rag_cli.testing.stack import Launcher, Stack, address
from retriever_svc.encoders import load_encoder
from tests.conftest import (
    RAG,
    TinyModels,
    build,
    corpus_records,
    details,
    index_build_args,
    passage_ids,
    wait_for,
    write_jsonl,
)

TOKEN = "test-admin-token-8c2e4a61f09b7d35"
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
    stack: Stack

    @property
    def gateway(self) -> str:
        return self.stack.gateway_address

    @property
    def retrievers(self) -> list[Served]:
        return self.stack.retrievers

    def ask(self, k: int = 4, timeout: float = 60) -> gateway_pb2.AskResponse:
        with grpc.insecure_channel(self.gateway) as channel:
            return gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
                gateway_pb2.AskRequest(question=QUESTION, k=k, options=generator_pb2.DecodingOptions(max_new_tokens=3)),
                timeout=timeout,
            )

    def swap(self, version: str, name: str = "", token: str | None = TOKEN) -> admin_pb2.SwapIndexResponse:
        with grpc.insecure_channel(self.gateway) as channel:
            return admin_pb2_grpc.AdminServiceStub(channel).SwapIndex(
                admin_pb2.SwapIndexRequest(name=name, version=version), timeout=120, metadata=_auth(token)
            )

    def status(self, token: str | None = TOKEN) -> list[index_admin_pb2.IndexStatus]:
        with grpc.insecure_channel(self.gateway) as channel:
            reply = admin_pb2_grpc.AdminServiceStub(channel).ListIndexStatus(
                admin_pb2.ListIndexStatusRequest(), timeout=120, metadata=_auth(token)
            )
        return list(reply.retrievers)


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    return bearer(token) if token is not None else ()


@pytest.fixture()
def cluster_factory(launch: Launcher, tiny: TinyModels) -> Callable[..., Cluster]:
    def make(root: Path, index: str, shards: int = 1) -> Cluster:
        return Cluster(launch.stack(root, index, tiny.rag_checkpoint, shards=shards, admin_token=TOKEN))

    return make


def build_version(root: Path, tmp: Path, tiny: TinyModels, version: str, shards: int = 1, name: str = "kb") -> str:
    return build(versioned_corpus(tmp, version), root, name, tiny.encoder_spec, shards=shards).version


def retriever_admin(served: Served, rpc: str, request: object) -> object:
    with grpc.insecure_channel(address(served)) as channel:
        return getattr(index_admin_pb2_grpc.IndexAdminServiceStub(channel), rpc)(
            request, timeout=60, metadata=bearer(TOKEN)
        )


def version_of(passage_id: str) -> str:
    return passage_id.split("-", 1)[0]


# ------------------------------------------------------------------------------------------------ swaps


def test_a_swap_updates_knowledge_and_a_swap_back_restores_it(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    root = tmp_path / "indexes"
    assert build_version(root, tmp_path, tiny, "v1") == "v1" and build_version(root, tmp_path, tiny, "v2") == "v2"
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
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1", shards=2)
    build_version(root, tmp_path, tiny, "v2", shards=2)
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


def test_gateway_replicas_follow_the_newest_swap_made_through_any_of_them(
    tmp_path: Path, tiny: TinyModels, launch: Launcher
) -> None:
    """Two gateways over two replicas of one shard, reconciling every 50 ms: a swap through one and a rollback
    through the other leave every retriever on the rollback's version, and nobody moves it back (each gateway
    used to restore its own last swap, so the version flipped between them); a retriever restarted on another
    version is brought to it."""
    from prometheus_client import REGISTRY

    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    retrievers = [launch.retriever(root, "kb", admin_token=TOKEN) for _ in range(2)]  # "kb": the newest, v1
    build_version(root, tmp_path, tiny, "v2")
    generator = launch.generator(tiny.rag_checkpoint)
    replicas = "|".join(address(r) for r in retrievers)
    one, other = (
        Cluster(Stack(retrievers, generator, launch.gateway(replicas, address(generator), admin_token=TOKEN,
                                                            reconcile_seconds=0.05)))
        for _ in range(2)
    )  # fmt: skip
    repairs = lambda: REGISTRY.get_sample_value("rag_index_swaps_total", {"outcome": "repaired"}) or 0.0  # noqa: E731
    polls = lambda: (
        REGISTRY.get_sample_value(  # noqa: E731  # the gateways' reconcile rounds ask every retriever
            "rag_requests_total", {"method": "/rag.v1.IndexAdminService/GetIndexStatus", "code": "OK"}
        )
        or 0.0
    )

    def settled(rounds: int = 10) -> None:
        """Wait until both gateways have had several reconcile rounds."""
        target = polls() + 2 * 2 * rounds
        wait_for(lambda: polls() >= target, "the gateways stopped reconciling")

    def versions() -> set[tuple[str, int]]:
        try:
            return {(s.active_version, s.swap_generation) for s in one.status()}
        except grpc.RpcError:  # a retriever restarting
            return set()

    swapped = one.swap("v2")
    rolled_back = other.swap("v1")
    assert rolled_back.swap_generation > swapped.swap_generation > 0
    before = repairs()
    settled()
    assert versions() == {("kb@v1", rolled_back.swap_generation)} and repairs() == before
    assert {version_of(s.passage.id) for s in one.ask().sources} == {"v1"}

    port = retrievers[0].port
    launch.stop(retrievers[0])
    restarted = launch.retriever(root, "kb", admin_token=TOKEN, port=port)  # comes up on the newest, v2
    assert {s.active_version for s in [retriever_status(restarted)]} == {"kb@v2"}
    wait_for(lambda: versions() == {("kb@v1", rolled_back.swap_generation)}, "the restarted retriever stayed on v2")
    settled()  # both gateways may have seen it on v2 and be moving it (to the same version): let both land
    repaired = repairs()
    assert repaired > before
    settled()
    assert versions() == {("kb@v1", rolled_back.swap_generation)} and repairs() == repaired
    for cluster in (one, other):
        assert {version_of(s.passage.id) for s in cluster.ask().sources} == {"v1"}


def retriever_status(served: Served) -> index_admin_pb2.IndexStatus:
    reply = retriever_admin(served, "GetIndexStatus", index_admin_pb2.GetIndexStatusRequest())
    return reply.status  # type: ignore[attr-defined]


def test_answers_stay_on_one_version_while_shards_disagree(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    """Freeze a swap halfway (shard 0 activated, shard 1 not) by driving the retrievers directly: every answer
    must still come from one version on both shards."""
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1", shards=2)
    build_version(root, tmp_path, tiny, "v2", shards=2)
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


def test_sharded_exact_search_returns_the_unsharded_top_k(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    one, three = tmp_path / "one", tmp_path / "three"
    corpus = versioned_corpus(tmp_path, "v1")
    build(corpus, one, "kb", tiny.encoder_spec, shards=1)
    manifest = build(corpus, three, "kb", tiny.encoder_spec, shards=3)
    assert manifest.num_shards == 3 and sum(manifest.shard_counts) == manifest.count
    unsharded, sharded = cluster_factory(one, "kb"), cluster_factory(three, "kb", shards=3)
    for k in (1, 7, 20):
        a, b = unsharded.ask(k=k), sharded.ask(k=k)
        assert [s.passage.id for s in b.sources] == [s.passage.id for s in a.sources]
        # Hybrid by default: fused scores (dense / 0.05 + BM25) of float32 sums, equal to float32 precision.
        assert [s.passage.score for s in b.sources] == pytest.approx(
            [s.passage.score for s in a.sources], rel=1e-5, abs=1e-6
        )


def test_rebuilding_reuses_unchanged_embeddings_exactly(tmp_path: Path, tiny: TinyModels) -> None:
    root = tmp_path / "indexes"
    build(versioned_corpus(tmp_path, "v1"), root, "kb", tiny.encoder_spec)
    corpus = versioned_corpus(tmp_path, "v2")
    reused = build(corpus, root, "kb", tiny.encoder_spec)
    fresh = build(corpus, root, "fresh", tiny.encoder_spec, reuse_embeddings=False)
    borrowed = build(corpus, root, "other", tiny.encoder_spec, reuse_from=IndexRef("kb", "v1"))
    a, b, c = (np.load(root / m.name / m.version / "shard-0" / "embeddings.npy") for m in (reused, fresh, borrowed))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(c, b, atol=1e-6)
    assert reused.embeddings_reused == {"from": "kb@v1", "passages": reused.count - 1}  # all but the changed fact
    assert borrowed.embeddings_reused == {"from": "kb@v1", "passages": reused.count - 1} and not fresh.embeddings_reused


@pytest.mark.parametrize(
    ("limit_kib", "failing", "reason"),
    [(16, "staging.sqlite", "(SQLITE_IOERR_WRITE)"), (300, "embeddings.npy", "(File too large)")],
)
def test_a_build_out_of_space_fails_in_one_line_and_leaves_nothing(
    tmp_path: Path, tiny: TinyModels, limit_kib: int, failing: str, reason: str
) -> None:
    """The build's files may not grow past `limit_kib` (RLIMIT_FSIZE, what a full disk looks like to a writer):
    the SQLite stores fail first at 16 KiB, the embeddings (3,000 x 32 floats, 375 KiB) at 300 KiB. Either way,
    one line names the file and the space the build needs, no temp file stays, and no version is published.
    The embeddings used to be a sparse memory map: a full disk killed the build with SIGBUS."""
    records = [{"id": f"d{i}", "title": "Fact", "text": f"fact number {i}"} for i in range(3000)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    root = tmp_path / "indexes"
    limit = limit_kib * 1024
    result = subprocess.run(
        [*RAG, *index_build_args(corpus, root, "kb", tiny.encoder_spec)],
        capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("rag index: ")]
    assert f"cannot write {root / 'kb'}" in error and failing in error and reason in error, error
    assert "this build needs about" in error and "nothing was published" in error, error
    assert sorted(p.name for p in (root / "kb").iterdir()) == []  # no version, temp directory or lock


def test_a_build_that_cannot_fit_is_refused_before_encoding(
    tmp_path: Path, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil as shutil_module

    from rag.errors import ResourceExhausted
    from retriever_svc import build as build_module

    encoded = []
    real_usage = shutil_module.disk_usage
    monkeypatch.setattr(build_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=50_000))
    monkeypatch.setattr(build_module, "_encode_shard", lambda *args: encoded.append(args))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_records(400))
    with pytest.raises(ResourceExhausted, match=r"still to write\): this build needs about .* and 48.8 KiB is free"):
        build(corpus, tmp_path / "indexes", "kb", tiny.encoder_spec)
    assert encoded == [] and sorted((tmp_path / "indexes" / "kb").iterdir()) == []


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_build_never_inherits_a_damaged_version(
    tmp_path: Path, tiny: TinyModels, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 18, item 4: a version the retriever refuses must not become the next version with fresh checksums.
    root = tmp_path / "indexes"
    build(versioned_corpus(tmp_path, "v1"), root, "kb", tiny.encoder_spec)
    embeddings = root / "kb" / "v1" / "shard-0" / "embeddings.npy"
    if damage == "corrupt":  # same size, other numbers: the rankings would be wrong
        data = bytearray(embeddings.read_bytes())
        data[-400:] = bytes(400)
        embeddings.write_bytes(bytes(data))
    else:
        _truncate(embeddings)
    corpus = versioned_corpus(tmp_path, "v2")
    with caplog.at_level("WARNING", logger="retriever_svc.build"):
        rebuilt = build(corpus, root, "kb", tiny.encoder_spec)
    assert not rebuilt.embeddings_reused  # encoded, not inherited
    warnings = [r.getMessage() for r in caplog.records if "not reusing" in r.getMessage()]
    assert warnings == ["not reusing the embeddings of kb@v1: checksum mismatch for shard-0/embeddings.npy; "
                        "encoding what an older version cannot give"]  # fmt: skip
    fresh = build(corpus, root, "fresh", tiny.encoder_spec, reuse_embeddings=False)
    np.testing.assert_allclose(
        np.load(root / "kb" / rebuilt.version / "shard-0" / "embeddings.npy"),
        np.load(root / "fresh" / fresh.version / "shard-0" / "embeddings.npy"),
        atol=1e-6,
    )
    with pytest.raises(FailedPrecondition, match="cannot reuse embeddings from kb@v1: checksum mismatch"):
        build(corpus, root, "other", tiny.encoder_spec, reuse_from=IndexRef("kb", "v1"))


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
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    serving_encoder = load_encoder(tiny.encoder_spec).info

    _truncate(_copy_version(root, "v1", "v2") / "shard-0" / "embeddings.npy")
    _flip_a_byte(_copy_version(root, "v1", "v3") / "shard-0" / "passages.sqlite")
    (_copy_version(root, "v1", "v4") / "manifest.json").unlink()
    other = save_sentence_encoder(tmp_path / "other-encoder", seed=7)  # same dimension, other weights
    build(versioned_corpus(tmp_path, "v2"), root, "kb", f"sentence-transformer:{other}")  # v5
    narrow = save_sentence_encoder(tmp_path / "narrow-encoder", hidden=16)
    build(versioned_corpus(tmp_path, "v2"), root, "kb", f"sentence-transformer:{narrow}")  # v6
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
        assert reason in details(err.value) and "every retriever still serves kb@v1" in details(err.value), details(
            err.value
        )
        assert cluster.ask(k=1).index_version == "kb@v1"
        [status] = cluster.status()
        assert (status.active_version, status.staged_version) == ("kb@v1", "")


def test_a_served_file_truncated_on_disk_neither_kills_the_retriever_nor_passes_a_swap_to_it(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    cluster = cluster_factory(root, "kb@v1")
    embeddings = root / "kb" / "v1" / "shard-0" / "embeddings.npy"
    with embeddings.open("r+b") as handle:  # in place, as a bad copy or a full disk would
        handle.truncate(embeddings.stat().st_size // 3)
    assert cluster.ask(k=2).index_version == "kb@v1"  # read into RAM when loaded: no SIGBUS
    with pytest.raises(grpc.RpcError) as err:  # a swap to the active version checks its files again
        cluster.swap("v1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum mismatch for shard-0/embeddings.npy" in details(err.value)
    assert cluster.ask(k=2).index_version == "kb@v1"


def test_a_swap_to_the_active_version_whose_directory_was_deleted_is_refused_not_internal(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    # Issue 18, item 8: the files are checked again on a swap; gone, they are a precondition, not a bug.
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    cluster = cluster_factory(root, "kb@v1")
    shutil.rmtree(root / "kb" / "v1")
    with pytest.raises(grpc.RpcError) as err:
        cluster.swap("v1", name="kb")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details(err.value)
    assert cluster.ask(k=2).index_version == "kb@v1"  # still served from memory


def test_a_swap_to_a_symlinked_version_is_refused_not_unavailable(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    """kb/v3 -> v2 used to load as kb@v2 and fail the activation of kb@v3 as UNAVAILABLE (which clients retry)."""
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    build_version(root, tmp_path, tiny, "v2")
    (root / "kb" / "v3").symlink_to("v2")
    cluster = cluster_factory(root, "kb@v1")
    with pytest.raises(grpc.RpcError) as err:
        cluster.swap("v3")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details(err.value)
    assert "kb@v3 is a symbolic link to kb/v2" in details(err.value) and "swap to kb@v2 itself" in details(err.value)
    assert [s.active_version for s in cluster.status()] == ["kb@v1"]


def test_admin_rpcs_need_the_token_and_stay_inside_the_index_root(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1")
    build_version(root, tmp_path, tiny, "v2")
    cluster = cluster_factory(root, "kb@v1")
    for token, message in ((None, "need `authorization: Bearer <token>`"), ("wrong", "not valid")):
        with pytest.raises(grpc.RpcError) as err:
            cluster.swap("v2", token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in details(err.value)
    for version, name in (("../v2", ""), ("/etc/passwd", ""), ("v1", "../../etc"), ("v1", "kb/.."), ("v1\n", "")):
        with pytest.raises(grpc.RpcError) as err:
            cluster.swap(version, name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, name)
    assert cluster.ask(k=1).index_version == "kb@v1"


def test_a_retriever_holds_at_most_two_versions(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    """Driving one retriever directly: loading a third version evicts the other inactive one first."""
    root = tmp_path / "indexes"
    for version in ("v1", "v2", "v1"):
        build_version(root, tmp_path, tiny, version)  # kb v1, v2, v3
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
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is active" in details(err.value)


def test_swaps_and_refused_loads_are_counted(
    tmp_path: Path, tiny: TinyModels, cluster_factory: Callable[..., Cluster]
) -> None:
    from prometheus_client import REGISTRY

    def value(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    root = tmp_path / "indexes"
    build_version(root, tmp_path, tiny, "v1", name="metered")
    build_version(root, tmp_path, tiny, "v2", name="metered")
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
