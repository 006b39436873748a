"""Asking the gateway: the client side of `rag ask` and the demo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rag.clients import unary
from rag.config import option
from rag.errors import InvalidArgument
from rag.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2


@dataclass
class AskConfig:
    gateway: str = option("127.0.0.1:50051", "gateway address")
    mode: str = option("token", "token (RAG-Token), sequence (RAG-Sequence), or a baseline: closed-book, concat")
    sequence_decoding: str = option("thorough", "RAG-Sequence decoding: thorough or fast")
    k: int = option(5, "passages to retrieve")
    n_docs: int = option(0, "condition on the best n_docs of them; 0 = all k")
    num_beams: int = option(1, "beam size; 1 = greedy")
    num_return_sequences: int = option(1, "answers to return (at most num_beams)")
    max_new_tokens: int = option(0, "answer length limit in tokens; 0 = the generator's default")
    timeout: float = option(300.0, "deadline in seconds")
    json: bool = option(False, "print one JSON object instead of text")


MODES = {
    "token": generator_pb2.RAG_MODE_TOKEN,
    "sequence": generator_pb2.RAG_MODE_SEQUENCE,
    "closed-book": generator_pb2.RAG_MODE_CLOSED_BOOK,
    "concat": generator_pb2.RAG_MODE_CONCAT,
}
DECODINGS = {"thorough": generator_pb2.SEQUENCE_DECODING_THOROUGH, "fast": generator_pb2.SEQUENCE_DECODING_FAST}


def ask(question: str, config: AskConfig, retrieve_only: bool = False) -> dict[str, Any]:
    """Ask the gateway; the answer as the JSON object `rag ask --json` prints."""
    if config.mode not in MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.sequence_decoding not in DECODINGS:
        raise InvalidArgument(f"--sequence-decoding must be thorough or fast, got {config.sequence_decoding!r}")
    request = gateway_pb2.AskRequest(
        question=question,
        k=config.k,
        retrieve_only=retrieve_only,
        options=generator_pb2.DecodingOptions(
            mode=MODES[config.mode],
            sequence_decoding=DECODINGS[config.sequence_decoding],
            num_beams=config.num_beams,
            num_return_sequences=config.num_return_sequences,
            max_new_tokens=config.max_new_tokens,
            n_docs=config.n_docs,
        ),
    )
    reply = unary(config.gateway, gateway_pb2_grpc.GatewayServiceStub, "Ask", request, config.timeout)
    return {
        "answer": reply.answers[0].text if reply.answers else "",
        "answers": [{"text": a.text, "log_prob": a.log_prob} for a in reply.answers],
        "mode": config.mode,
        "index_version": reply.index_version,
        "passages": [
            {
                "id": s.passage.id,
                "title": s.passage.title,
                "text": s.passage.text,
                "score": s.passage.score,
                "prior": s.prior,
                "posterior": s.posterior,
            }
            for s in reply.sources
        ],
        "timings_ms": {
            "retrieve": reply.timings.retrieve_ms,
            "generate": reply.timings.generate_ms,
            "total": reply.timings.total_ms,
        },
    }


MODE_LABELS = {
    "token": "RAG-Token",
    "sequence": "RAG-Sequence",
    "closed-book": "closed book",
    "concat": "concatenated passages",
}


def format_answer(question: str, result: dict[str, Any], top: int = 3) -> str:
    lines = [f"Q: {question}", f"A: {result['answer']}"]
    lines.append(
        f"   {MODE_LABELS.get(result['mode'], result['mode'])} over {result['index_version']}, "
        f"{result['timings_ms']['total'] / 1000:.1f} s (retrieve {result['timings_ms']['retrieve']:.0f} ms)"
    )
    lines.append("   sources by posterior p(z|x,y)   [prior p(z|x)]")
    ranked = sorted(result["passages"], key=lambda p: -p["posterior"])[:top]
    for p in ranked:
        snippet = p["text"][:90].replace("\n", " ")
        lines.append(f"   {p['posterior']:6.1%}  [{p['prior']:5.1%}]  {p['title']} ({p['id']}): {snippet}...")
    return "\n".join(lines)
