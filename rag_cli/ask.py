"""Asking the gateway: the client side of `rag ask`, `rag eval` and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rag.clients import call, stream
from rag.config import option
from rag.tls import ClientTLS, ClientTLSConfig
from rag.types import Answer, AskRequest, DecodingOptions, Mode, RetrievalMode, SequenceDecoding
from rag.v1 import gateway_pb2_grpc


@dataclass
class AskConfig(ClientTLSConfig):
    gateway: str = option("127.0.0.1:50051", "gateway address")
    mode: str = option("token", "token (RAG-Token), sequence (RAG-Sequence), or a baseline: closed-book, concat")
    sequence_decoding: str = option("thorough", "RAG-Sequence decoding: thorough or fast")
    k: int = option(5, "passages to retrieve")
    retrieval: str = option("", "dense, lexical or hybrid; empty: the gateway's default")
    n_docs: int = option(0, "condition on the best n_docs of them; 0 = all k")
    num_beams: int = option(1, "beam size; 1 = greedy")
    num_return_sequences: int = option(1, "answers to return (at most num_beams)")
    max_new_tokens: int = option(0, "answer length limit in tokens; 0 = the generator's default")
    timeout: float = option(300.0, "deadline in seconds")
    json: bool = option(False, "print one JSON object instead of text")

    def request(self, question: str, retrieve_only: bool = False) -> AskRequest:
        """The question with these options, parsed once."""
        options = DecodingOptions(
            mode=Mode.parse(self.mode),
            sequence_decoding=SequenceDecoding.parse(self.sequence_decoding),
            num_beams=self.num_beams,
            num_return_sequences=self.num_return_sequences,
            max_new_tokens=self.max_new_tokens,
            n_docs=self.n_docs,
        )
        retrieval = RetrievalMode.parse(self.retrieval) if self.retrieval else None
        return AskRequest(question, self.k, options, retrieve_only, retrieval)


def ask(request: AskRequest, gateway: str, timeout: float, tls: ClientTLS | None = None) -> Answer:
    reply = call(gateway, lambda ch: gateway_pb2_grpc.GatewayServiceStub(ch).Ask(request.to_pb(), timeout=timeout), tls)
    return Answer.from_pb(reply)


def ask_stream(
    request: AskRequest, gateway: str, timeout: float, tls: ClientTLS | None = None
) -> Iterator[str | Answer]:
    """The answer's text as it is decoded (pieces that concatenate to it), then the whole answer."""
    replies = stream(
        gateway,
        lambda ch: gateway_pb2_grpc.GatewayServiceStub(ch).AskStream(request.to_stream_pb(), timeout=timeout),
        tls,
    )
    for reply in replies:
        yield Answer.from_pb(reply.final) if reply.HasField("final") else reply.text_delta


def as_json(answer: Answer, mode: Mode) -> dict[str, Any]:
    """The object `rag ask --json` prints."""
    return {
        "answer": answer.text,
        "answers": [{"text": a.text, "log_prob": a.log_prob} for a in answer.answers],
        "mode": mode.value,
        "retrieval": answer.retrieval.value,
        "index_version": str(answer.index),
        "passages": [
            {
                "id": s.passage.id,
                "title": s.passage.title,
                "text": s.passage.text,
                "score": s.passage.score,
                "dense_score": s.passage.dense_score,
                "lexical_score": s.passage.lexical_score,
                "prior": s.prior,
                "posterior": s.posterior,
            }
            for s in answer.sources
        ],
        "timings_ms": {
            "retrieve": answer.timings.retrieve_ms,
            "generate": answer.timings.generate_ms,
            "total": answer.timings.total_ms,
        },
    }


def format_answer(question: str, answer: Answer, mode: Mode, top: int = 3) -> str:
    return f"Q: {question}\nA: {answer.text}\n" + format_sources(answer, mode, top)


def format_sources(answer: Answer, mode: Mode, top: int = 3) -> str:
    """What follows the answer: how it was made, and the passages it rests on, by posterior."""
    t = answer.timings
    lines = [
        f"   {mode.label} over {answer.index} ({answer.retrieval.value} retrieval), {t.total_ms / 1000:.1f} s "
        f"(retrieve {t.retrieve_ms:.0f} ms)"
    ]
    lines.append("   sources by posterior p(z|x,y)   [prior p(z|x)]")
    for s in sorted(answer.sources, key=lambda s: -s.posterior)[:top]:
        snippet = s.passage.text[:90].replace("\n", " ")
        lines.append(f"   {s.posterior:6.1%}  [{s.prior:5.1%}]  {s.passage.title} ({s.passage.id}): {snippet}...")
    return "\n".join(lines)
