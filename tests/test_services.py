"""The services' contract over gRPC: Ask end to end, validation, statuses, deadlines, health, reflection,
metrics."""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rag import host, metrics
from rag.serving import ServerConfig, ServerThread, new_server
from rag.types import AskRequest, DecodingOptions, Mode
from rag.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc, passage_pb2
from rag_cli.testing import random_models
from rag_cli.testing.stack import Launcher, address, loopback
from tests.conftest import Services, TinyModels, details

PASSAGES = [
    passage_pb2.Passage(
        id="fleming", title="Alexander Fleming", text="Fleming discovered penicillin in 1928.", score=0.9
    ),
    passage_pb2.Passage(id="paris", title="Paris", text="Paris is the capital of France.", score=0.5),
    passage_pb2.Passage(id="everest", title="Mount Everest", text="Everest is the highest mountain.", score=0.1),
]


def ask(
    services: Services, question: str = "Who discovered penicillin?", timeout: float = 60, **fields: Any
) -> gateway_pb2.AskResponse:
    return services.gateway_stub().Ask(gateway_pb2.AskRequest(question=question, **fields), timeout=timeout)


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# ------------------------------------------------------------------------------------------------ gateway


@pytest.mark.parametrize("mode", [Mode.TOKEN, Mode.SEQUENCE])
def test_ask_answers_with_provenance(services: Services, mode: Mode) -> None:
    options = DecodingOptions(mode=mode, num_beams=2, num_return_sequences=2, max_new_tokens=8).to_pb()
    reply = ask(services, k=4, options=options)
    assert reply.index_version == "tiny@v1"
    assert len(reply.answers) == 2 and all(a.text for a in reply.answers)
    assert reply.answers[0].log_prob >= reply.answers[1].log_prob or mode is Mode.TOKEN
    assert len(reply.sources) == 4
    priors = [s.prior for s in reply.sources]
    posteriors = [s.posterior for s in reply.sources]
    assert sum(priors) == pytest.approx(1, abs=1e-4) and sum(posteriors) == pytest.approx(1, abs=1e-4)
    assert posteriors == pytest.approx(list(reply.answers[0].passage_posteriors))
    scores = [s.passage.score for s in reply.sources]
    assert scores == sorted(scores, reverse=True)  # best retrieval first; priors follow the scores
    assert priors == sorted(priors, reverse=True)
    t = reply.timings
    assert 0 < t.retrieve_ms < t.total_ms and 0 < t.generate_ms < t.total_ms


def test_ask_conditions_on_n_docs_of_the_k_retrieved(services: Services) -> None:
    reply = ask(services, k=5, options=generator_pb2.DecodingOptions(n_docs=2, max_new_tokens=4))
    assert len(reply.sources) == 2


def test_the_gateway_passes_on_what_its_generator_allows(
    services: Services, launch: Launcher, tiny: TinyModels
) -> None:
    """Decoding limits belong to the generator: the gateway in front of one started with a higher
    --max-new-tokens accepts what that generator accepts, and passes on its refusal of more."""
    generator = launch.generator(tiny.rag_checkpoint, max_new_tokens=400)
    gateway = launch.gateway(services.retriever, address(generator))
    with grpc.insecure_channel(address(gateway)) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        question = "Who discovered penicillin?"
        reply = stub.Ask(AskRequest(question, 2, DecodingOptions(max_new_tokens=300)).to_pb(), timeout=120)
        assert reply.answers  # a gateway with limits of its own refused anything above 256
        err = status_of(
            lambda: stub.Ask(AskRequest(question, 2, DecodingOptions(max_new_tokens=401)).to_pb(), timeout=60)
        )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens must be in [1, 400]" in details(err)


class SlowGenerator(generator_pb2_grpc.GeneratorServiceServicer):
    """A generator that takes its time and records the deadline it was given."""

    def __init__(self) -> None:
        self.seen_remaining: list[float] = []

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        self.seen_remaining.append(context.time_remaining())
        await asyncio.sleep(5)
        return generator_pb2.GenerateResponse()

    async def Score(
        self, request: generator_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.ScoreResponse:
        raise NotImplementedError

    def GenerateStream(
        self, request: generator_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateStreamResponse]:
        raise NotImplementedError


def test_gateway_passes_on_what_is_left_of_the_callers_deadline(
    services: Services, loop_thread: ServerThread, launch: Launcher
) -> None:
    slow = SlowGenerator()
    fake = loop_thread.run(
        new_server(
            loopback(ServerConfig),
            ("rag.v1.GeneratorService",),
            lambda s: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(slow, s),
            (),
        )
    )
    gateway = launch.gateway(services.retriever, address(fake))
    try:
        started = time.monotonic()
        with grpc.insecure_channel(address(gateway)) as channel:
            err = status_of(
                lambda: gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
                    gateway_pb2.AskRequest(question="who?"), timeout=1.5
                )
            )
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3
        # What was left of the 1.5 s (gRPC rounds timeouts up a little), not the gateway's own 120 s default.
        assert len(slow.seen_remaining) == 1 and 0 < slow.seen_remaining[0] < 1.6
    finally:
        loop_thread.run(fake.stop(0))


def test_gateway_reports_an_unreachable_service_as_unavailable(services: Services, launch: Launcher) -> None:
    gateway = launch.gateway("127.0.0.1:1", services.generator)
    with grpc.insecure_channel(address(gateway)) as channel:
        err = status_of(
            lambda: gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
                gateway_pb2.AskRequest(question="who?"), timeout=10
            )
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err).startswith("retriever shard 0:")


# ------------------------------------------------------------------------------------------------ generator


def generate(services: Services, **fields: Any) -> generator_pb2.GenerateResponse:
    fields.setdefault("question", "Who discovered penicillin?")
    fields.setdefault("passages", PASSAGES)
    return services.generator_stub().Generate(generator_pb2.GenerateRequest(**fields), timeout=60)


def test_fast_and_thorough_rag_sequence_both_return_ranked_answers(services: Services) -> None:
    for decoding in (generator_pb2.SEQUENCE_DECODING_FAST, generator_pb2.SEQUENCE_DECODING_THOROUGH):
        options = generator_pb2.DecodingOptions(
            mode=generator_pb2.RAG_MODE_SEQUENCE,
            sequence_decoding=decoding,
            num_beams=3,
            num_return_sequences=3,
            max_new_tokens=6,
        )
        hypotheses = generate(services, options=options).hypotheses
        assert len(hypotheses) == 3 and len({tuple(h.token_ids) for h in hypotheses}) == 3
        if decoding == generator_pb2.SEQUENCE_DECODING_THOROUGH:  # thorough ranks by the exact marginal
            log_probs = [h.log_prob for h in hypotheses]
            assert log_probs == sorted(log_probs, reverse=True)


def test_beam_search_for_one_token_returns_only_the_answers_it_found(services: Services) -> None:
    """With one new token and a checkpoint that forces the end-of-sequence token (BART's forced_eos_token_id), beam
    search finds one hypothesis; the other beams' slots are empty and are not returned as empty answers. Before,
    they were, and scoring an empty answer failed the request with INTERNAL."""
    token, sequence, concat = (
        generator_pb2.RAG_MODE_TOKEN,
        generator_pb2.RAG_MODE_SEQUENCE,
        generator_pb2.RAG_MODE_CONCAT,
    )
    for options in (
        generator_pb2.DecodingOptions(mode=sequence, num_beams=2, num_return_sequences=2, max_new_tokens=1,
                                      sequence_decoding=generator_pb2.SEQUENCE_DECODING_FAST),
        generator_pb2.DecodingOptions(mode=sequence, num_beams=2, max_new_tokens=1),
        generator_pb2.DecodingOptions(mode=token, num_beams=2, num_return_sequences=2, max_new_tokens=1),
        generator_pb2.DecodingOptions(mode=concat, num_beams=3, num_return_sequences=3, max_new_tokens=1),
    ):  # fmt: skip
        reply = generate(services, options=options)
        assert reply.hypotheses and all(len(h.token_ids) == 1 for h in reply.hypotheses), options
        assert all(math.isfinite(h.log_prob) for h in reply.hypotheses)


def test_doc_scores_can_come_from_embeddings(services: Services) -> None:
    query = [1.0, 0.0]
    with_embeddings = [
        passage_pb2.Passage(id=p.id, title=p.title, text=p.text, embedding=e)
        for p, e in zip(PASSAGES, ([2.0, 1.0], [0.5, 3.0], [1.0, 1.0]), strict=True)
    ]
    with_scores = [
        passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=s)
        for p, s in zip(PASSAGES, (2.0, 0.5, 1.0), strict=True)
    ]
    options = generator_pb2.DecodingOptions(max_new_tokens=4)
    a = generate(services, passages=with_embeddings, query_embedding=query, options=options)
    b = generate(services, passages=with_scores, options=options)
    assert list(a.passage_priors) == pytest.approx(list(b.passage_priors))
    assert [h.token_ids for h in a.hypotheses] == [h.token_ids for h in b.hypotheses]


def test_score_temperature_sharpens_the_prior(services: Services) -> None:
    flat = generate(
        services, options=generator_pb2.DecodingOptions(max_new_tokens=2, score_temperature=10)
    ).passage_priors
    sharp = generate(
        services, options=generator_pb2.DecodingOptions(max_new_tokens=2, score_temperature=0.05)
    ).passage_priors
    assert max(flat) < 0.4 and max(sharp) > 0.99


def test_huge_finite_scores_at_the_lowest_temperature_give_finite_priors(services: Services) -> None:
    # 1e36 / 1e-3 overflows float32; the prior must still be the softmax, not NaN (issue 18, item 7).
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=s)
                for p, s in zip(PASSAGES, (1e36, 0.0, -1e36), strict=True)]  # fmt: skip
    options = generator_pb2.DecodingOptions(max_new_tokens=2, score_temperature=1e-3)
    reply = generate(services, passages=passages, options=options)
    assert list(reply.passage_priors) == [1.0, 0.0, 0.0]
    assert all(math.isfinite(x) for h in reply.hypotheses for x in (h.log_prob, *h.passage_posteriors))


def test_embeddings_whose_dot_products_pass_float32s_range_give_finite_priors(services: Services) -> None:
    # Each value is a finite float32, q . d = 1e40 is not: computed in float32 the prior was NaN, with status OK.
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, embedding=e)
                for p, e in zip(PASSAGES, ([1e20, 0.0], [-1e20, 0.0], [0.0, 1e20]), strict=True)]  # fmt: skip
    reply = generate(services, passages=passages, query_embedding=[1e20, 0.0],
                     options=generator_pb2.DecodingOptions(max_new_tokens=2))  # fmt: skip
    assert list(reply.passage_priors) == [1.0, 0.0, 0.0]
    assert all(math.isfinite(x) for h in reply.hypotheses for x in (h.log_prob, *h.passage_posteriors))


def test_prompts_and_answers_beyond_the_models_positions_are_refused(launch: Launcher, tmp_path: Path) -> None:
    """A decoder-only model reads a fixed number of positions (GPT-2's position table; the length a rotary model was
    trained on). A request whose longest prompt with its answer would not fit is refused with INVALID_ARGUMENT that
    says what to change, before any work: RAG's rows (one passage each) fit where the concatenation of every passage
    does not. Before, a GPT-2 indexed past its table (INTERNAL) and a rotary model read on past its length."""
    from transformers import AutoTokenizer

    from generator_svc.prompts import ChatPrompt

    chat = ChatPrompt(random_models.chat_tokenizer())
    passages = [passage_pb2.Passage(id=f"p{i}", title=f"Title {i}", text="Fleming discovered penicillin. " * 3,
                                    score=1.0) for i in range(4)]  # fmt: skip
    question = "Who discovered penicillin?"
    row = len(chat.ids(question, [(passages[0].title, passages[0].text)]))
    every = len(chat.ids(question, [(p.title, p.text) for p in passages]))
    assert row + 8 < every  # room for a RAG row and 8 answer tokens, not for the concatenated prompt
    lm = random_models.save_causal_lm(tmp_path / "lm", positions=row + 8)
    assert AutoTokenizer.from_pretrained(lm).chat_template == chat.tokenizer.chat_template
    served = launch.generator(lm)

    def generate(mode: generator_pb2.RagMode.ValueType, new_tokens: int) -> generator_pb2.GenerateResponse:
        options = generator_pb2.DecodingOptions(mode=mode, max_new_tokens=new_tokens)
        request = generator_pb2.GenerateRequest(question=question, passages=passages, options=options)
        with grpc.insecure_channel(address(served)) as channel:
            return generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=60)

    assert generate(generator_pb2.RAG_MODE_TOKEN, 8).hypotheses
    for mode, new_tokens in ((generator_pb2.RAG_MODE_CONCAT, 8), (generator_pb2.RAG_MODE_TOKEN, 9)):
        with pytest.raises(grpc.RpcError) as refused:
            generate(mode, new_tokens)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"do not fit the model's {row + 8} positions" in details(refused.value)


def test_generator_refuses_work_beyond_its_queue(launch: Launcher, tiny: TinyModels) -> None:
    served = launch.generator(tiny.rag_checkpoint, max_queue=1)
    options = generator_pb2.DecodingOptions(num_beams=8, max_new_tokens=200)
    request = generator_pb2.GenerateRequest(
        question="Who discovered penicillin?", passages=PASSAGES * 10, options=options
    )
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stub.Generate.future(request, timeout=120).exception) for _ in range(6)]
            errors = [f.result() for f in futures]
    codes = [e.code() for e in errors if isinstance(e, grpc.RpcError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert errors.count(None) >= 1  # the queued one was served


def test_a_generator_that_cannot_load_stays_not_serving_and_unavailable(launch: Launcher, tmp_path: Path) -> None:
    served = launch.generator(tmp_path / "missing")
    assert served.loading is not None and "does not exist" in str(served.loading.exception())
    with grpc.insecure_channel(address(served)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="rag.v1.GeneratorService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        err = status_of(
            lambda: generator_pb2_grpc.GeneratorServiceStub(channel).Generate(
                generator_pb2.GenerateRequest(question="q", passages=PASSAGES), timeout=5
            )
        )
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "still loading" in details(err)


# ------------------------------------------------------------------------------------------------ hygiene


@pytest.mark.parametrize(
    ("service", "name"),
    [
        ("retriever", "rag.v1.RetrieverService"),
        ("generator", "rag.v1.GeneratorService"),
        ("gateway", "rag.v1.GatewayService"),
    ],
)
def test_every_service_reports_health_and_serves_reflection(services: Services, service: str, name: str) -> None:
    with grpc.insecure_channel(getattr(services, service)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for target in ("", name):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=target), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        listed = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert name in listed and "grpc.health.v1.Health" in listed


def test_metrics_count_requests_by_method_and_code(services: Services) -> None:
    port = metrics.serve_metrics("127.0.0.1", 0, families=metrics.RETRIEVER)  # the services run in this process
    ask(services, options=generator_pb2.DecodingOptions(max_new_tokens=2))
    status_of(lambda: ask(services, question=""))
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'rag_requests_total{code="OK",method="/rag.v1.GatewayService/Ask"}' in page
    assert 'rag_requests_total{code="INVALID_ARGUMENT",method="/rag.v1.GatewayService/Ask"}' in page
    assert 'rag_requests_total{code="OK",method="/rag.v1.RetrieverService/Search"}' in page
    for stage in ("encode", "search", "generate", "retrieve", "end_to_end"):
        assert f'rag_stage_duration_seconds_count{{stage="{stage}"}}' in page
    assert 'rag_index_info{name="tiny",version="v1"} 1.0' in page


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 without a limit
        ({}, None),  # no cgroup files (not Linux, or not mounted)
    ],
)
def test_the_cpu_limit_is_read_from_cgroup_v2_then_v1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], limit: float
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(host, "CGROUP", tmp_path)
    assert host.container_cpu_limit() == limit


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a 1-CPU limit only shows on 2 cores or more")
def test_services_size_their_thread_pools_by_the_containers_cpu_limit_not_the_nodes_cores(
    launch: Launcher, index_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container sees every core of its node; torch and FAISS would start one spinning thread per core."""
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # 1 CPU
    monkeypatch.setattr(host, "CGROUP", tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    port = metrics.serve_metrics("127.0.0.1", 0, families=metrics.RETRIEVER)
    try:
        launch.retriever(index_root, "tiny")
        assert pool_sizes_of_a_new_thread() == (1, 1)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'rag_compute_threads{basis="cpu_limit"} 1.0' in page
        launch.retriever(index_root, "tiny", threads=2)  # --threads wins over the limit
        assert pool_sizes_of_a_new_thread() == (2, 2)
    finally:  # the services of this test process share torch's and FAISS's pools
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def test_only_the_model_thread_and_the_retrievers_compute_thread_keep_openmp_teams(
    launch: Launcher, tiny: TinyModels, index_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch keeps an OpenMP team of worker threads for every thread that has run parallel work, while the thread
    lives; with more OpenMP threads than cores libgomp stops spinning between parallel regions, and a decoding
    step of the demo model on 2 cores took ~78 ms beside one idle thread that had once computed, ~58 ms without.
    So: the generator loads (and warms up) on a thread that then ends; a request's own thread computes serially
    (OpenMP's count and MKL's are one there, whose vector math opens teams of its own size: the process's default
    unchanged for threads started later); the retriever loads and searches on one thread, whichever request asks."""
    from generator_svc import loading, rag_math
    from generator_svc.joint import torch_mkl
    from retriever_svc import server as retriever_server

    seen: dict[str, list[Any]] = {"load": [], "request": [], "search": []}
    load, generate, search = loading.load_passage_lm, rag_math.generate, retriever_server.Retriever.search

    def loaded(*args: Any, **kwargs: Any) -> Any:
        seen["load"].append(threading.current_thread())
        return load(*args, **kwargs)

    def generated(*args: Any, **kwargs: Any) -> Any:
        seen["request"].append((threading.current_thread().name, torch.get_num_threads(), mkl_threads()))
        return generate(*args, **kwargs)

    def searched(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["search"].append(threading.current_thread())
        return search(self, *args, **kwargs)

    monkeypatch.setattr("generator_svc.server.load_passage_lm", loaded)
    monkeypatch.setattr(rag_math, "generate", generated)
    monkeypatch.setattr(retriever_server.Retriever, "search", searched)

    def mkl_threads() -> int:  # what MKL's vector math would use on this thread (1 where torch has no MKL)
        mkl = torch_mkl()
        return mkl.MKL_Get_Max_Threads() if mkl is not None else 1

    default = torch.get_num_threads()
    stack = launch.stack(index_root, "tiny", tiny.causal_lm)
    mkl_default = default if torch_mkl() is not None else 1
    seen["request"].clear()  # the warm-up's, on the loading thread
    with grpc.insecure_channel(stack.gateway_address) as channel, ThreadPoolExecutor(3) as pool:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        questions = ["Who?", "What?", "When?"]
        answers = list(pool.map(lambda q: stub.Ask(AskRequest(q, 2).to_pb(), timeout=60), questions))
    assert all(a.answers for a in answers)
    assert len(seen["load"]) == 1 and not seen["load"][0].is_alive()  # the loading thread ended
    # (The first request after start may run on the model thread itself, before requests join each other's passes.)
    assert len(seen["request"]) == 3 and set(seen["request"]) <= {("request", 1, 1), ("model", default, mkl_default)}
    assert ("request", 1, 1) in seen["request"]
    assert pool_sizes_of_a_new_thread()[0] == default  # what threads started later take, as before
    assert len(set(seen["search"])) == 1 and len(seen["search"]) == 3


def pool_sizes_of_a_new_thread() -> tuple[int, int]:
    """torch's and FAISS's thread counts as a thread that serves requests sees them: OpenMP keeps a count per
    thread, and a thread takes the process's setting when it first runs parallel work."""
    with ThreadPoolExecutor(1) as fresh:
        return fresh.submit(lambda: (torch.get_num_threads(), faiss.omp_get_max_threads())).result()


class LoopBlockingGenerator(SlowGenerator):
    """A generator whose first call blocks its event loop until released: later calls wait to be dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking, self.release = threading.Event(), threading.Event()

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        if request.question == "block":
            self.blocking.set()
            self.release.wait(120)  # holds the event loop, as a handler that blocks by mistake would
        return generator_pb2.GenerateResponse()


def test_calls_cancelled_before_dispatch_are_counted() -> None:
    """Calls whose deadline passed while they waited for a busy event loop never reached a handler and were
    missing from rag_requests_total; now they are counted as CANCELLED."""
    from prometheus_client import REGISTRY

    method = "/rag.v1.GeneratorService/Generate"
    counted = lambda code: REGISTRY.get_sample_value("rag_requests_total", {"method": method, "code": code}) or 0.0  # noqa: E731
    servicer, thread = LoopBlockingGenerator(), ServerThread()
    try:
        served = thread.run(
            new_server(
                loopback(ServerConfig),
                ("rag.v1.GeneratorService",),
                lambda s: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, s),
                (),
            )
        )
        before = counted("OK"), counted("CANCELLED")
        with grpc.insecure_channel(address(served)) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            blocker = stub.Generate.future(generator_pb2.GenerateRequest(question="block"), timeout=120)
            assert servicer.blocking.wait(60)
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(generator_pb2.GenerateRequest(question="q"), timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            servicer.release.set()
            blocker.result()
        deadline = time.monotonic() + 60
        while (counted("OK") - before[0], counted("CANCELLED") - before[1]) != (1, 5):
            assert time.monotonic() < deadline, (counted("OK") - before[0], counted("CANCELLED") - before[1])
            time.sleep(0.02)
    finally:
        servicer.release.set()
        thread.close()


def test_the_metrics_port_answers_probes_that_cannot_speak_tls() -> None:
    serving = False
    port = metrics.serve_metrics("127.0.0.1", 0, lambda: serving)

    def status(path: str) -> int:
        try:
            return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status)
        except urllib.error.HTTPError as err:
            return err.code

    assert (status("/readyz"), status("/livez")) == (503, 200)
    serving = True
    assert (status("/readyz"), status("/livez"), status("/metrics")) == (200, 200, 200)


def test_half_open_connections_to_the_metrics_port_hold_no_more_than_a_few_threads() -> None:
    """100 connections that send nothing used to hold a thread each, forever; now at most 16 are served at once
    and each is dropped after 5 s of silence, after which a scrape is answered again."""
    import socket
    import threading

    port = metrics.serve_metrics("127.0.0.1", 0)
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    most = 0

    def scraped() -> bool:
        nonlocal most
        most = max(most, threading.active_count() - threads_before)
        try:
            return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5).status) == 200
        except OSError:  # refused while the idle connections hold every slot
            return False

    deadline = time.monotonic() + 120
    while not scraped():
        assert time.monotonic() < deadline, "the metrics port never answered again"
        time.sleep(0.1)
    for sock in idle:
        sock.close()
    assert most <= metrics.MAX_METRICS_CONNECTIONS + 1, most


def test_baselines_use_the_same_generator_with_no_or_all_passages(services: Services) -> None:
    def answer(
        mode: generator_pb2.RagMode.ValueType, passages: list[passage_pb2.Passage]
    ) -> generator_pb2.GenerateResponse:
        return generate(services, passages=passages, options=generator_pb2.DecodingOptions(mode=mode, max_new_tokens=6))

    closed = [answer(generator_pb2.RAG_MODE_CLOSED_BOOK, p) for p in (PASSAGES, PASSAGES[1:])]
    assert closed[0].hypotheses[0].token_ids == closed[1].hypotheses[0].token_ids  # passages are not read
    assert not closed[0].hypotheses[0].passage_posteriors and len(closed[0].passage_priors) == 3
    # Concatenating one passage is RAG over that one passage; over three it reads something else.
    one = [PASSAGES[0]]
    assert (
        answer(generator_pb2.RAG_MODE_CONCAT, one).hypotheses[0].token_ids
        == answer(generator_pb2.RAG_MODE_TOKEN, one).hypotheses[0].token_ids
    )
    assert (
        answer(generator_pb2.RAG_MODE_CONCAT, PASSAGES).hypotheses[0].log_prob
        != answer(generator_pb2.RAG_MODE_CONCAT, one).hypotheses[0].log_prob
    )


def test_ask_can_retrieve_only(services: Services) -> None:
    reply = ask(services, k=3, retrieve_only=True)
    assert not reply.answers and len(reply.sources) == 3 and reply.index_version == "tiny@v1"
    assert reply.timings.generate_ms == 0 and reply.timings.retrieve_ms > 0


def test_baseline_answers_report_no_posterior(services: Services) -> None:
    reply = ask(
        services, k=3, options=generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_CONCAT, max_new_tokens=3)
    )
    assert reply.answers and [s.posterior for s in reply.sources] == [0, 0, 0]
    assert sum(s.prior for s in reply.sources) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_concurrent_requests_are_batched_without_changing_answers(
    launch: Launcher, tiny: TinyModels, family: str
) -> None:
    from prometheus_client import REGISTRY

    served = launch.generator(tiny.rag_checkpoint if family == "encoder-decoder" else tiny.causal_lm, max_batch=8)
    questions = [
        "Who discovered penicillin?",
        "What is the capital of France?",
        "How high is Everest?",
        "Why?",
        "When was it built, and by whom exactly?",
        "Who?",
    ]
    options = generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_TOKEN, num_beams=2, max_new_tokens=12)

    def request(i: int) -> generator_pb2.GenerateRequest:  # different questions and passage lengths in one batch
        passages = [
            passage_pb2.Passage(id=p.id, title=p.title, text=p.text * (1 + (i + j) % 3), score=p.score)
            for j, p in enumerate(PASSAGES)
        ]
        return generator_pb2.GenerateRequest(question=questions[i], passages=passages, options=options)

    batches = lambda: (
        REGISTRY.get_sample_value("rag_generator_batch_size_count") or 0,
        REGISTRY.get_sample_value("rag_generator_batch_size_sum") or 0,
    )  # noqa: E731
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        alone = [stub.Generate(request(i), timeout=60) for i in range(len(questions))]
        count, total = batches()
        futures = [stub.Generate.future(request(i), timeout=60) for i in range(len(questions))]
        together = [f.result() for f in futures]
    passes, requests = batches()[0] - count, batches()[1] - total
    if family == "encoder-decoder":  # whole requests batched: some shared a batch
        assert requests == len(questions) and passes < len(questions)
    else:  # counted per decoding pass (continuous batching): some passes decoded several requests
        assert requests > passes
    for a, b in zip(alone, together, strict=True):
        assert [h.token_ids for h in a.hypotheses] == [h.token_ids for h in b.hypotheses]
        assert [h.log_prob for h in a.hypotheses] == pytest.approx([h.log_prob for h in b.hypotheses], abs=1e-3)


def test_streams_share_batches_with_each_other_and_with_unary_requests(launch: Launcher, tiny: TinyModels) -> None:
    """GenerateStream used to decode each request alone; now streams and Generates that decode alike share a
    batch, and each stream still gets its own question's text as it is decoded."""
    from prometheus_client import REGISTRY

    served = launch.generator(tiny.causal_lm, max_batch=8)
    questions = ["Who discovered penicillin?", "What is the capital of France?", "How high is Everest?", "Why?"]
    options = generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_TOKEN, max_new_tokens=12)
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in PASSAGES]
    unary = [generator_pb2.GenerateRequest(question=q, passages=passages, options=options) for q in questions]
    streamed = [generator_pb2.GenerateStreamRequest(question=q, passages=passages, options=options) for q in questions]
    batches = lambda: (  # noqa: E731
        REGISTRY.get_sample_value("rag_generator_batch_size_count") or 0,
        REGISTRY.get_sample_value("rag_generator_batch_size_sum") or 0,
    )
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        alone = [stub.Generate(r, timeout=60) for r in unary]
        before = batches()
        with ThreadPoolExecutor(len(questions) * 2) as pool:
            streams = [pool.submit(lambda r: list(stub.GenerateStream(r, timeout=60)), r) for r in streamed]
            unaries = [pool.submit(stub.Generate, r, timeout=60) for r in unary]
            replies, together = [f.result() for f in streams], [f.result() for f in unaries]
    after = batches()
    assert after[1] - before[1] > after[0] - before[0]  # some decoding passes served several requests
    for reference, stream, answered in zip(alone, replies, together, strict=True):
        final = stream[-1].final
        assert [h.token_ids for h in final.hypotheses] == [h.token_ids for h in reference.hypotheses]
        assert [h.token_ids for h in answered.hypotheses] == [h.token_ids for h in reference.hypotheses]
        assert "".join(r.text_delta for r in stream[:-1]) == final.hypotheses[0].text


def test_requests_join_the_decoding_passes_in_flight_and_answer_as_they_would_alone(
    launch: Launcher, tiny: TinyModels
) -> None:
    """Continuous batching (decoder-only): a request admitted while another is decoding joins its passes at the next
    step boundary, whatever its options (RAG-Token or RAG-Sequence, greedy with drafts or beams, the baselines),
    and every answer is the one it gets alone."""
    from prometheus_client import REGISTRY

    served = launch.generator(tiny.causal_lm, max_batch=8, draft_tokens=8)
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in PASSAGES]
    token, sequence = generator_pb2.RAG_MODE_TOKEN, generator_pb2.RAG_MODE_SEQUENCE
    long = generator_pb2.DecodingOptions(mode=token, max_new_tokens=160)
    joiners = [
        generator_pb2.GenerateRequest(question=q, passages=passages, options=options)
        for q, options in [
            ("Who discovered penicillin?", generator_pb2.DecodingOptions(mode=token, max_new_tokens=12)),
            ("What is the capital of France?", generator_pb2.DecodingOptions(mode=sequence, max_new_tokens=12)),
            ("Why?", generator_pb2.DecodingOptions(mode=sequence, num_beams=2, max_new_tokens=8,
                                                   sequence_decoding=generator_pb2.SEQUENCE_DECODING_FAST)),
            ("When was it built?", generator_pb2.DecodingOptions(mode=token, num_beams=2, max_new_tokens=8)),
            ("Who?", generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_CONCAT, max_new_tokens=12)),
            ("How high?", generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_CLOSED_BOOK, max_new_tokens=12)),
        ]
    ]  # fmt: skip
    joined = lambda: REGISTRY.get_sample_value("rag_generator_joined_requests_total") or 0.0  # noqa: E731
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        first = generator_pb2.GenerateRequest(question="Tell me everything.", passages=passages, options=long)
        alone_first = stub.Generate(first, timeout=60)
        # It decodes every token it may (the tiny model does not end it), so the others arrive while it decodes.
        assert len(alone_first.hypotheses[0].token_ids) == long.max_new_tokens
        alone = [stub.Generate(r, timeout=60) for r in joiners]
        before = joined()
        stream = stub.GenerateStream(
            generator_pb2.GenerateStreamRequest(question=first.question, passages=passages, options=long), timeout=60
        )
        next(stream)  # it is decoding
        futures = [stub.Generate.future(r, timeout=60) for r in joiners]
        together = [f.result() for f in futures]
        streamed = list(stream)
    assert joined() - before >= 1  # joined at a step boundary, not after the first ended
    assert streamed[-1].final.hypotheses[0].token_ids == alone_first.hypotheses[0].token_ids
    for a, b in zip(alone, together, strict=True):
        assert [h.token_ids for h in a.hypotheses] == [h.token_ids for h in b.hypotheses]
        assert [h.log_prob for h in a.hypotheses] == pytest.approx([h.log_prob for h in b.hypotheses], abs=1e-3)
        for ha, hb in zip(a.hypotheses, b.hypotheses, strict=True):
            assert list(ha.passage_posteriors) == pytest.approx(list(hb.passage_posteriors), abs=1e-3)


def _long_and_short() -> tuple[generator_pb2.GenerateRequest, generator_pb2.GenerateRequest]:
    """A request that decodes every token it may (the tiny LM does not end it), and a short one."""
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in PASSAGES]
    long = generator_pb2.GenerateRequest(question="Tell me everything.", passages=passages,
                                         options=generator_pb2.DecodingOptions(max_new_tokens=160))  # fmt: skip
    short = generator_pb2.GenerateRequest(question="Who discovered penicillin?", passages=passages,
                                          options=generator_pb2.DecodingOptions(max_new_tokens=12))  # fmt: skip
    return long, short


def _in_flight(stub: Any, request: generator_pb2.GenerateRequest) -> Any:
    """A stream of `request`, decoding: its first reply has come."""
    stream = stub.GenerateStream(
        generator_pb2.GenerateStreamRequest(question=request.question, passages=request.passages,
                                            options=request.options), timeout=60)  # fmt: skip
    next(stream)
    return stream


def test_a_request_that_cannot_join_the_passes_in_flight_fails_alone_and_the_generator_serves_on(
    launch: Launcher, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joining the rows being decoded builds the union's tensors anew (a GPU may run out of memory there). Where that
    fails, the request that joins gets RESOURCE_EXHAUSTED and the one in flight decodes on to its own answer. Before,
    the failed join left its rows in the union: the request in flight failed, the model thread died, and every later
    request waited for its deadline while the health check said SERVING."""
    from generator_svc.joint import Rows

    served = launch.generator(tiny.causal_lm, max_batch=8)
    failed: list[int] = []
    build = Rows._state

    def state(self: Rows, parts: list[Any], *args: Any, **kwargs: Any) -> Any:
        if len(parts) > 1 and not failed:  # a second request joins the first's passes
            failed.append(len(parts))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.20 GiB (injected)")
        return build(self, parts, *args, **kwargs)

    monkeypatch.setattr(Rows, "_state", state)
    long, short = _long_and_short()
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        long_alone, short_alone = stub.Generate(long, timeout=60), stub.Generate(short, timeout=60)
        stream = _in_flight(stub, long)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(short, timeout=60)
        streamed = list(stream)
        after = stub.Generate(short, timeout=60)
    assert failed == [2]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in details(refused.value)
    assert streamed[-1].final.hypotheses[0].token_ids == long_alone.hypotheses[0].token_ids
    assert after.hypotheses[0].token_ids == short_alone.hypotheses[0].token_ids


@pytest.mark.parametrize("where", ["feed", "leave"])
def test_when_the_shared_passes_fail_the_requests_in_them_fail_and_the_generator_serves_on(
    launch: Launcher, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A failing pass over the union (its cache may be half grown), or bookkeeping as a request leaves it, fails
    every request in flight with a status, and the union starts empty: later requests are answered as before. Before,
    a failure as a request left killed the model thread, and every later request waited for its deadline."""
    from generator_svc.joint import Rows

    served = launch.generator(tiny.causal_lm, max_batch=8)
    failed: list[int] = []
    original = getattr(Rows, where)

    def failing(self: Rows, *args: Any, **kwargs: Any) -> Any:
        if len(self.parts) > 1 and not failed:  # with two requests in flight
            failed.append(len(self.parts))
            raise RuntimeError(f"a bug in Rows.{where} (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Rows, where, failing)
    long, short = _long_and_short()
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        short_alone = stub.Generate(short, timeout=60)
        stream = _in_flight(stub, long)
        joined = stub.Generate.future(short, timeout=60)
        with pytest.raises(grpc.RpcError) as stopped:
            list(stream)
        try:
            joined.result()  # it fails with the pass, or ended before the failure as it left
        except grpc.RpcError as error:
            assert where == "feed" and error.code() == grpc.StatusCode.INTERNAL
        after = [stub.Generate(short, timeout=60), stub.Generate(short, timeout=60)]
    assert failed == [2]
    assert stopped.value.code() == grpc.StatusCode.INTERNAL
    assert [a.hypotheses[0].token_ids for a in after] == [short_alone.hypotheses[0].token_ids] * 2


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_drafted_greedy_decoding_gives_plain_greedys_tokens(launch: Launcher, tiny: TinyModels, family: str) -> None:
    """Greedy RAG-Token, RAG-Sequence (each passage) and the baselines verify tokens drafted from the inputs and the
    answer so far, several per pass; the answers, scores and posteriors are plain greedy's, and accepted drafts are
    counted."""
    from prometheus_client import REGISTRY

    model = tiny.rag_checkpoint if family == "encoder-decoder" else tiny.causal_lm
    plain, drafted = launch.generator(model, draft_tokens=0), launch.generator(model, draft_tokens=4)
    accepted = lambda: REGISTRY.get_sample_value("rag_generator_draft_accepted_tokens_sum") or 0.0  # noqa: E731
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in PASSAGES]
    requests = [
        generator_pb2.GenerateRequest(question=q, passages=passages, options=options)
        for q in ("Who discovered penicillin?", "What is the capital of France?", "How high is Everest?")
        for options in (
            generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_TOKEN, max_new_tokens=40),
            generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_SEQUENCE, max_new_tokens=40),
            generator_pb2.DecodingOptions(
                mode=generator_pb2.RAG_MODE_SEQUENCE,
                sequence_decoding=generator_pb2.SEQUENCE_DECODING_FAST,
                max_new_tokens=40,
            ),
            generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_CONCAT, max_new_tokens=40),
            generator_pb2.DecodingOptions(mode=generator_pb2.RAG_MODE_CLOSED_BOOK, max_new_tokens=40),
        )
    ]
    replies = []
    before = accepted()
    for served in (plain, drafted):
        with grpc.insecure_channel(address(served)) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            replies.append([stub.Generate(r, timeout=60) for r in requests])
    for a, b in zip(*replies, strict=True):
        assert [h.token_ids for h in a.hypotheses] == [h.token_ids for h in b.hypotheses]
        assert [h.log_prob for h in a.hypotheses] == pytest.approx([h.log_prob for h in b.hypotheses], abs=1e-4)
        for ha, hb in zip(a.hypotheses, b.hypotheses, strict=True):
            assert list(ha.passage_posteriors) == pytest.approx(list(hb.passage_posteriors), abs=1e-4)
    if family == "encoder-decoder":  # the tiny BART repeats itself: drafts from its own answer are accepted
        assert accepted() > before


# ------------------------------------------------------------------------------------------------ streaming


def ask_stream(address: str, request: AskRequest, timeout: float = 60) -> tuple[list[str], gateway_pb2.AskResponse]:
    with grpc.insecure_channel(address) as channel:
        replies = list(gateway_pb2_grpc.GatewayServiceStub(channel).AskStream(request.to_stream_pb(), timeout=timeout))
    assert replies and replies[-1].HasField("final") and not any(r.HasField("final") for r in replies[:-1])
    return [r.text_delta for r in replies[:-1]], replies[-1].final


def test_ask_stream_sends_the_answer_as_it_is_decoded_then_what_ask_returns(services: Services) -> None:
    request = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=12))
    deltas, final = ask_stream(services.gateway, request)
    unary = ask(services, question=request.question, k=3, options=request.options.to_pb())
    assert "".join(deltas) == final.answers[0].text == unary.answers[0].text and len(deltas) > 1
    assert [(s.passage.id, s.prior, s.posterior) for s in final.sources] == [
        (s.passage.id, s.prior, s.posterior) for s in unary.sources
    ]
    assert final.index_version == unary.index_version and final.timings.generate_ms > 0


@pytest.mark.parametrize(
    ("method", "old", "new", "reply"),
    [
        ("/rag.v1.GatewayService/AskStream", gateway_pb2.AskRequest, gateway_pb2.AskStreamRequest,
         gateway_pb2.AskStreamResponse),
        ("/rag.v1.GeneratorService/GenerateStream", generator_pb2.GenerateRequest, generator_pb2.GenerateStreamRequest,
         generator_pb2.GenerateStreamResponse),
    ],
)  # fmt: skip
def test_streaming_requests_are_their_unary_twins_on_the_wire(
    services: Services, method: str, old: Any, new: Any, reply: Any
) -> None:
    """AskStream and GenerateStream took AskRequest and GenerateRequest (buf lint: one request type per RPC);
    their own request types keep the fields, numbers and types, so clients built before still stream."""

    def fields(message: Any) -> list[tuple[Any, ...]]:
        return [
            (f.number, f.name, f.type, f.is_repeated, f.json_name, f.message_type and f.message_type.full_name)
            for f in message.DESCRIPTOR.fields
        ]

    assert fields(old) == fields(new)
    request: Any
    if old is gateway_pb2.AskRequest:
        address_, request = services.gateway, AskRequest("Who?", 3, DecodingOptions(max_new_tokens=2)).to_pb()
    else:
        passage = passage_pb2.Passage(id="p", title="P", text="Fleming", score=1.0)
        address_, request = services.generator, generator_pb2.GenerateRequest(question="Who?", passages=[passage])
    with grpc.insecure_channel(address_) as channel:  # a client that still sends the unary request's bytes
        call = channel.unary_stream(
            method, request_serializer=old.SerializeToString, response_deserializer=reply.FromString
        )
        replies = list(call(request, timeout=60))
    assert replies and replies[-1].HasField("final")


def test_streams_decoded_again_after_their_batch_failed_send_each_token_once(
    launch: Launcher, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder-decoder batches whole requests; where a batch fails (out of memory on the batch, not on one
    request), each request is decoded again alone. Its stream has sent text already: the tokens come again and are
    not sent twice, so the deltas still add up to the final answer. Before, the text so far was sent again."""
    from generator_svc.families import EncoderDecoderLM
    from generator_svc.passage_lm import PassageLM

    served = launch.generator(tiny.rag_checkpoint, max_batch=8)
    worker = served.servicers[0].worker
    holding, release, queued = threading.Event(), threading.Event(), threading.Semaphore(0)
    encode, feed, submit = EncoderDecoderLM.encode, PassageLM.feed, worker.submit
    failed: list[int] = []

    def held_encode(self: EncoderDecoderLM, questions: list[str], *args: Any, **kwargs: Any) -> Any:
        if questions == ["Hold."]:  # keeps the model thread busy until both streams wait
            holding.set()
            assert release.wait(60)
        return encode(self, questions, *args, **kwargs)

    def failing_feed(self: PassageLM, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        if state.ctx.num_questions == 2 and state.fed == 3 and not failed:  # the two streams' batch, text sent
            failed.append(state.fed)
            raise RuntimeError("a batched pass failed (injected)")
        return feed(self, state, tokens)

    def counted_submit(job: Any) -> None:
        submit(job)
        queued.release()

    monkeypatch.setattr(EncoderDecoderLM, "encode", held_encode)
    monkeypatch.setattr(PassageLM, "feed", failing_feed)
    monkeypatch.setattr(worker, "submit", counted_submit)
    passages = [passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in PASSAGES]
    options = generator_pb2.DecodingOptions(max_new_tokens=12)
    questions = ["Who discovered penicillin?", "What is the capital of France?"]
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        alone = [stub.Generate(generator_pb2.GenerateRequest(question=q, passages=passages, options=options),
                               timeout=60) for q in questions]  # fmt: skip
        hold = generator_pb2.GenerateRequest(question="Hold.", passages=passages,
                                             options=generator_pb2.DecodingOptions(max_new_tokens=2))  # fmt: skip
        held = stub.Generate.future(hold, timeout=60)
        assert holding.wait(60) and queued.acquire(timeout=60)
        with ThreadPoolExecutor(2) as pool:
            streams = [
                pool.submit(lambda q: list(stub.GenerateStream(generator_pb2.GenerateStreamRequest(
                    question=q, passages=passages, options=options), timeout=60)), q)
                for q in questions
            ]  # fmt: skip
            assert queued.acquire(timeout=60) and queued.acquire(timeout=60)  # both wait: they form one batch
            release.set()
            replies = [f.result() for f in streams]
        held.result()
    assert failed == [3]
    for reference, stream in zip(alone, replies, strict=True):
        final = stream[-1].final
        assert final.hypotheses[0].token_ids == reference.hypotheses[0].token_ids
        assert len(final.hypotheses[0].token_ids) > 4  # text was sent before the batch failed
        assert "".join(r.text_delta for r in stream[:-1]) == final.hypotheses[0].text


def test_rag_sequence_streams_its_answer_when_it_is_known(services: Services) -> None:
    options = DecodingOptions(mode=Mode.SEQUENCE, num_beams=2, max_new_tokens=8)
    deltas, final = ask_stream(services.gateway, AskRequest("Who discovered penicillin?", 3, options))
    assert deltas == ([final.answers[0].text] if final.answers[0].text else [])


def test_a_cancelled_stream_stops_the_generators_decode(services: Services, launch: Launcher, tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    # A generator that cannot end an answer before 250 tokens: a decode long enough to be cancelled midway.
    checkpoint = tmp_path / "long-answers"
    random_models.save_rag_checkpoint(checkpoint, n_docs=4, generation={"min_new_tokens": 250})
    generator = launch.generator(checkpoint)
    gateway = launch.gateway(services.retriever, address(generator))
    stopped = lambda: REGISTRY.get_sample_value("rag_generator_decodes_stopped_total") or 0.0  # noqa: E731
    before = stopped()
    request = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=256))
    with grpc.insecure_channel(address(gateway)) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).AskStream(request.to_stream_pb(), timeout=120)
        first = next(call)
        assert first.HasField("text_delta")  # decoding has begun
        call.cancel()
        deadline = time.monotonic() + 60
        while stopped() == before:  # the generator notices between two steps
            assert time.monotonic() < deadline, "the decode ran on after its caller cancelled"
            time.sleep(0.05)
        quick = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=2))
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Ask(quick.to_pb(), timeout=60)
    assert len(reply.answers) == 1  # the model is free again


def test_a_new_client_reaches_a_service_started_again_where_an_old_client_saw_one_go(
    services: Services, launch: Launcher, tiny: TinyModels
) -> None:
    """Each client channel keeps its own connections. grpc shares them between a process's channels to the same
    address by default, so while an old channel backed off from a generator that had gone, a new gateway's channel
    to a generator started again on that address failed with UNAVAILABLE ("connections to all backends failing")
    until the backoff ended: a test failed so when its generator got a port a stopped one had used."""
    question = AskRequest("Who discovered penicillin?", 2).to_pb()
    gone = launch.generator(tiny.causal_lm)
    old = launch.gateway(services.retriever, address(gone))
    with grpc.insecure_channel(address(old)) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        assert stub.Ask(question, timeout=60).answers
        launch.stop(gone)
        assert status_of(lambda: stub.Ask(question, timeout=60)).code() == grpc.StatusCode.UNAVAILABLE
    again = launch.generator(tiny.causal_lm, port=gone.port)
    new = launch.gateway(services.retriever, address(again))
    with grpc.insecure_channel(address(new)) as channel:
        assert gateway_pb2_grpc.GatewayServiceStub(channel).Ask(question, timeout=60).answers


def test_overload_is_shed_before_retrieval(services: Services, launch: Launcher, tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    checkpoint = tmp_path / "long-answers"  # decodes that stay in progress until cancelled
    random_models.save_rag_checkpoint(checkpoint, n_docs=4, generation={"min_new_tokens": 250})
    gateway = launch.gateway(services.retriever, address(launch.generator(checkpoint)), max_in_flight=1, max_waiting=0)
    searches = lambda: REGISTRY.get_sample_value(  # noqa: E731
        "rag_requests_total", {"method": "/rag.v1.RetrieverService/Search", "code": "OK"}
    )
    long = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=256))
    quick = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=2))
    with grpc.insecure_channel(address(gateway)) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        call = stub.AskStream(long.to_stream_pb(), timeout=120)
        assert next(call).HasField("text_delta")  # the one slot is taken
        before = searches()
        err = status_of(lambda: stub.Ask(quick.to_pb(), timeout=60))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity" in details(err)
        assert searches() == before  # refused before any retrieval
        call.cancel()
        deadline = time.monotonic() + 60
        while True:  # the slot frees once the cancelled stream has unwound
            try:
                assert len(stub.Ask(quick.to_pb(), timeout=60).answers) == 1
                break
            except grpc.RpcError as busy:
                assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
