"""Faults through gRPC: a table of bad inputs to every service (each gets its status and a message a user can act
on, and the service stays SERVING), and admin authentication that is logged and limited."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag.auth import AdminAuth, bearer
from rag.errors import RagError
from rag.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    generator_pb2,
    generator_pb2_grpc,
    index_admin_pb2,
    index_admin_pb2_grpc,
    passage_pb2,
    retriever_pb2,
)
from rag_cli.testing import random_models
from rag_cli.testing.stack import Launcher, address
from tests.conftest import Services, TinyModels, details

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD_PASSAGE = passage_pb2.Passage(id="fleming", title="Alexander Fleming", text="Fleming found penicillin.", score=1)
NAN, INF = float("nan"), float("inf")


def ask(question: str = "Who discovered penicillin?", **fields: Any) -> gateway_pb2.AskRequest:
    return gateway_pb2.AskRequest(question=question, **fields)


def options(**fields: Any) -> gateway_pb2.AskRequest:
    return ask(options=generator_pb2.DecodingOptions(**fields))


def generate(passages: list[passage_pb2.Passage] | None = None, **fields: Any) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        question="Who discovered penicillin?", passages=[GOOD_PASSAGE] if passages is None else passages, **fields
    )


def passage(**fields: Any) -> list[passage_pb2.Passage]:
    return [passage_pb2.Passage(**{"id": "p", "title": "T", "text": "some text", **fields})]


def score(*answers: str) -> generator_pb2.ScoreRequest:
    return generator_pb2.ScoreRequest(question="Who discovered penicillin?", passages=[GOOD_PASSAGE], answers=answers)


def search(*questions: str, k: int = 2, **fields: Any) -> retriever_pb2.SearchRequest:
    return retriever_pb2.SearchRequest(questions=questions, k=k, **fields)


NOT_PROTOBUF = b"\xff\xff\xff\xff"
NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (the question, a string) holding two bytes that are not UTF-8

ASK, ASK_STREAM = "gateway /rag.v1.GatewayService/Ask", "gateway /rag.v1.GatewayService/AskStream"
GENERATE, SCORE = "generator /rag.v1.GeneratorService/Generate", "generator /rag.v1.GeneratorService/Score"
STREAM = "generator /rag.v1.GeneratorService/GenerateStream"
SEARCH = "retriever /rag.v1.RetrieverService/Search"
SWAP = "gateway /rag.v1.AdminService/SwapIndex"
LOAD = "retriever /rag.v1.IndexAdminService/LoadIndex"

# (where, request, status, what the message says)
BAD_INPUTS: list[tuple[str, Message | bytes, grpc.StatusCode, str]] = [
    (ASK, ask(""), INVALID, "question is empty"),
    (ASK, ask("   \n"), INVALID, "question is empty"),
    (ASK, ask("why? " * 1000), INVALID, "the limit is 2000"),
    (ASK, ask(k=51), INVALID, "k must be in [1, 50]"),
    (ASK, ask(k=-1), INVALID, "k must be in [1, 50]"),
    (ASK, ask(k=3, options=generator_pb2.DecodingOptions(n_docs=4)), INVALID, "n_docs=4 is more than the k=3"),
    (ASK, options(mode=7), INVALID, "unknown mode 7"),
    (ASK, options(sequence_decoding=9), INVALID, "unknown sequence_decoding 9"),
    (ASK, options(max_new_tokens=100_000), INVALID, "max_new_tokens must be in"),
    (ASK, options(num_beams=99), INVALID, "num_beams must be in [1, 8]"),
    (ASK, options(num_beams=2, num_return_sequences=3), INVALID, "num_return_sequences must be in [1, num_beams=2]"),
    (ASK, options(score_temperature=NAN), INVALID, "score_temperature must be 0"),
    (ASK, options(score_temperature=1e-45), INVALID, "score_temperature must be 0"),
    (ASK, options(score_temperature=-1), INVALID, "score_temperature must be 0"),
    (ASK, NOT_PROTOBUF, INVALID, "not a valid Ask message"),
    (ASK, NOT_UTF8, INVALID, "not a valid Ask message"),
    (ASK_STREAM, ask(""), INVALID, "question is empty"),
    (ASK_STREAM, NOT_PROTOBUF, INVALID, "not a valid AskStream message"),
    (GENERATE, generate([]), INVALID, "no passages given"),
    (GENERATE, generate(passage(title="", text=" ")), INVALID, "has neither title nor text"),
    (GENERATE, generate(passage(title="x" * 200_000)), INVALID, "200000-character title; the limit is 1000"),
    (GENERATE, generate(passage(text="x" * 25_000)), INVALID, "is 25000 characters; the limit is 20000"),
    (GENERATE, generate(passage() * 51), INVALID, "51 passages given; the limit is 50"),
    (GENERATE, generate(passage(score=NAN)), INVALID, "passage 'p''s score holds NaN or infinity"),
    (GENERATE, generate(passage(score=-INF)), INVALID, "passage 'p''s score holds NaN or infinity"),
    (GENERATE, generate(passage(embedding=[1.0, INF])), INVALID, "embedding holds NaN or infinity"),
    (GENERATE, generate(query_embedding=[NAN, 1.0]), INVALID, "query_embedding holds NaN or infinity"),
    (GENERATE, generate(query_embedding=[1.0, 2.0]), INVALID, "passage 0 has a 0-d embedding"),
    (GENERATE, generate(options=generator_pb2.DecodingOptions(n_docs=5)), INVALID, "n_docs=5 but only 1 passages"),
    (GENERATE, NOT_PROTOBUF, INVALID, "not a valid Generate message"),
    (STREAM, generate([]), INVALID, "no passages given"),
    (SCORE, score(), INVALID, "give 1 to 32 answers"),
    (SCORE, score("ok", " "), INVALID, "answer 1 is empty"),
    (SCORE, score(*["a"] * 33), INVALID, "give 1 to 32 answers"),
    (SCORE, score("x" * 100_000), INVALID, "answer 0 is 100000 characters; answers may be 256 tokens at most"),
    (SCORE, score("penicillin " * 400), INVALID, "tokens; answers may be 256 tokens at most"),
    (SEARCH, search(), INVALID, "no questions given"),
    (SEARCH, search(""), INVALID, "question is empty"),
    (SEARCH, search("q", k=0), INVALID, "k must be in [1,"),
    (SEARCH, search("q", index_version="tiny@v99"), grpc.StatusCode.FAILED_PRECONDITION, "tiny@v99 is not resident"),
    (SEARCH, search("q", index_version="tiny@v1\n"), INVALID, "must look like v<N>"),
    (SEARCH, NOT_UTF8, INVALID, "not a valid Search message"),
    (SWAP, admin_pb2.SwapIndexRequest(version="v2"), grpc.StatusCode.UNAUTHENTICATED, "admin RPCs are disabled"),
    (LOAD, b"", grpc.StatusCode.UNAUTHENTICATED, "admin RPCs are disabled"),
]


def call(channel: grpc.Channel, method: str, request: Message | bytes) -> None:
    """Send `request` (a message, or raw bytes as an attacker would) and read every reply."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if method.endswith("Stream"):
        list(channel.unary_stream(method, **identity)(raw, timeout=120))
    else:
        channel.unary_unary(method, **identity)(raw, timeout=120)


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("where", "request_", "code", "message"), BAD_INPUTS)
def test_bad_input_gets_a_clear_status_and_the_service_keeps_serving(
    services: Services, where: str, request_: Message | bytes, code: grpc.StatusCode, message: str
) -> None:
    service, method = where.split()
    with grpc.insecure_channel(getattr(services, service)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            call(channel, method, request_)
        assert err.value.code() == code and message in details(err.value), details(err.value)
        assert serving(channel)


STRONG = "faults-admin-token-7e41c09d2b8a5f36"


def test_failed_admin_authentications_are_logged_then_limited_but_never_lock_out_the_admin(
    launch: Launcher, tiny: TinyModels, index_root: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of bad tokens from the gateway's own host (loopback here; a node's SNAT in a cluster) is limited,
    but the right token still passes, on the gateway and on the retriever the gateway calls from that host."""
    from prometheus_client import REGISTRY

    refused = lambda outcome: (
        REGISTRY.get_sample_value(  # noqa: E731
            "rag_admin_auth_failures_total", {"outcome": outcome}
        )
        or 0.0
    )
    stack = launch.stack(index_root, "tiny", tiny.rag_checkpoint, admin_token=STRONG)
    before = refused("refused"), refused("throttled")
    request = admin_pb2.ListIndexStatusRequest()
    with (
        grpc.insecure_channel(stack.gateway_address) as gateway,
        grpc.insecure_channel(stack.retriever_addresses[0]) as retriever,
    ):
        admin = admin_pb2_grpc.AdminServiceStub(gateway)
        # The scheme is case-insensitive (RFC 7235).
        assert admin.ListIndexStatus(request, timeout=30, metadata=(("authorization", f"bearer {STRONG}"),)).retrievers
        index_admin = index_admin_pb2_grpc.IndexAdminServiceStub(retriever)
        codes = []
        with caplog.at_level(logging.WARNING, logger="rag.auth"):
            for _ in range(12):
                with pytest.raises(grpc.RpcError) as err:
                    index_admin.GetIndexStatus(
                        index_admin_pb2.GetIndexStatusRequest(), timeout=30, metadata=bearer("guess")
                    )
                codes.append(err.value.code())
        assert codes[:10] == [grpc.StatusCode.UNAUTHENTICATED] * 10
        assert codes[10:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert (refused("refused") - before[0], refused("throttled") - before[1]) == (10, 2)
        failures = [r.getMessage() for r in caplog.records if "admin authentication failed" in r.getMessage()]
        assert len(failures) == 10 and "sha256:" in failures[0] and "guess" not in failures[0]
        assert sum("further ones are counted" in r.getMessage() for r in caplog.records) == 1  # then one line
        # The flood came from the gateway's host: its calls to the retriever (with the right token) still pass.
        assert [
            s.active_version for s in admin.ListIndexStatus(request, timeout=30, metadata=bearer(STRONG)).retrievers
        ]
        swapped = admin.SwapIndex(admin_pb2.SwapIndexRequest(version="v1"), timeout=60, metadata=bearer(STRONG))
        assert swapped.index_version == "tiny@v1"


def test_a_guessable_admin_token_is_refused_at_start(tmp_path: Any, index_root: Any) -> None:
    from tests.conftest import rag

    for token in ("s3cret", "admin-token-admin", "ab" * 40):
        result = rag("serve", "retriever", "--index-root", str(index_root), "--index", "tiny", "--port", "0",
                     env={"RAG_ADMIN_TOKEN": token}, timeout=120)  # fmt: skip
        assert result.returncode != 0
        assert "bits of entropy; at least 128 are needed" in result.stderr and "Traceback" not in result.stderr, (
            result.stderr[-2000:]
        )


def test_failures_are_limited_in_all_as_well_as_per_host() -> None:
    """Twenty hosts with 3 bad tokens each stay under the per-host limit (10) but not under the overall one."""
    auth = AdminAuth(STRONG, per_host=10, total=50)
    codes = []
    for host in range(20):
        for _ in range(3):
            with pytest.raises(RagError) as err:
                auth.check(cast(Any, FakeCall(f"ipv4:127.0.0.{host + 2}:5000", "guess")))
            codes.append(err.value.code)
    assert codes[:50] == [grpc.StatusCode.UNAUTHENTICATED] * 50
    assert codes[50:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10
    assert auth.check(cast(Any, FakeCall("ipv4:127.0.0.2:5000", STRONG))).startswith("ipv4:127.0.0.2:5000")


@dataclass
class FakeCall:
    """What AdminAuth reads of a call: its peer and metadata."""

    address: str
    token: str

    def peer(self) -> str:
        return self.address

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


def test_answers_are_limited_to_the_positions_the_model_has(launch: Launcher, tmp_path: Any) -> None:
    """A BART with 40 positions holds 38 answer tokens: longer Score answers and Generate limits are refused
    before any work (they used to reach the model and fail with IndexError, as INTERNAL)."""
    checkpoint = tmp_path / "short-positions"
    random_models.save_rag_checkpoint(checkpoint, n_docs=1, shape=random_models.BartShape(positions=40))
    served = launch.generator(checkpoint)
    with grpc.insecure_channel(address(served)) as channel:
        for request, message in (
            (score("fleming " * 60), "answers may be 38 tokens at most"),
            (generate(options=generator_pb2.DecodingOptions(max_new_tokens=39)), "max_new_tokens must be in [1, 38]"),
        ):
            method = SCORE if isinstance(request, generator_pb2.ScoreRequest) else GENERATE
            with pytest.raises(grpc.RpcError) as err:
                call(channel, method.split()[1], request)
            assert err.value.code() == INVALID and message in details(err.value), details(err.value)
        assert call_ok(channel, generate(options=generator_pb2.DecodingOptions(max_new_tokens=38)))


def call_ok(channel: grpc.Channel, request: generator_pb2.GenerateRequest) -> bool:
    return len(generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=120).hypotheses) == 1
