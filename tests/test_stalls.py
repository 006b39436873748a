"""No request can hold the generator past its caller: costs are limited in the model's tokens before any work,
and prompt and scoring work runs in passes that check for the caller between them (as decoding steps do).

Each case goes through gRPC, with the decoder-only and the encoder-decoder family; progress is read from the
generator's metrics, never from timings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from rag.types import AskRequest, DecodingOptions, Mode, Passage
from rag.v1 import gateway_pb2_grpc, generator_pb2, generator_pb2_grpc
from rag_cli.testing.stack import Launcher, address
from tests.conftest import FACTS, TinyModels, corpus_records, details, wait_for

ASTRAL = "\U0001f600" * 2000  # 2,000 characters, the question limit; ~8,000 tokens for a byte-level BPE
FAMILIES = ("decoder-only", "encoder-decoder")


def model_of(tiny: TinyModels, family: str) -> Path:
    return tiny.causal_lm if family == "decoder-only" else tiny.rag_checkpoint


def counter(name: str, **labels: str) -> Callable[[], float]:
    return lambda: REGISTRY.get_sample_value(name, labels) or 0.0


prompt_tokens = counter("rag_generator_model_tokens_total", **{"pass": "prompt"})
scored_tokens = counter("rag_generator_model_tokens_total", **{"pass": "scored"})
stopped = counter("rag_generator_decodes_stopped_total")
dropped = counter("rag_generator_requests_dropped_total", reason="cancelled")
queue_depth = counter("rag_generator_queue_depth")


def passages(n: int) -> list[Passage]:
    return [Passage(r["id"], r["title"], r["text"], score=1.0) for r in corpus_records()[:n]]


def ask(address_: str, request: AskRequest, timeout: float | None = None) -> object:
    with grpc.insecure_channel(address_) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Ask(request.to_pb(), timeout=timeout)


NORMAL = AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_budgets_are_checked_before_any_model_work(
    launch: Launcher, tiny: TinyModels, index_root: Path, family: str
) -> None:
    stack = launch.stack(index_root, "tiny", model_of(tiny, family), max_prompt_tokens=2000)
    before = prompt_tokens()
    for request, limit in (
        (AskRequest(ASTRAL, 3), "this generator takes 512 at most (--max-question-tokens)"),
        (AskRequest("Who discovered penicillin?", 40), "this generator takes 2000 per request (--max-prompt-tokens)"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            ask(stack.gateway_address, request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details(err.value)
        assert limit in details(err.value) and "generator: " in details(err.value)
    assert prompt_tokens() == before  # refused before the model ran anything
    assert ask(stack.gateway_address, NORMAL, timeout=60).answers  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_passes_give_the_same_answers_and_scores(launch: Launcher, tiny: TinyModels, family: str) -> None:
    """Passes of 7 tokens (rows split, long rows run a few positions at a time) change nothing."""
    whole, chunked = (launch.generator(model_of(tiny, family), chunk_tokens=n) for n in (100_000, 7))
    given = [p.to_pb() for p in passages(5)]
    requests = [
        generator_pb2.GenerateRequest(question=f["title"] + "?", passages=given, options=options.to_pb())
        for f in FACTS
        for options in (
            DecodingOptions(mode=Mode.TOKEN, max_new_tokens=6),
            DecodingOptions(mode=Mode.TOKEN, num_beams=2, max_new_tokens=6),
            DecodingOptions(mode=Mode.SEQUENCE, num_beams=2, max_new_tokens=6),
            DecodingOptions(mode=Mode.CONCAT, max_new_tokens=6),
        )
    ]
    score = generator_pb2.ScoreRequest(question="Who?", passages=given, answers=["Fleming", "the capital of France"])
    replies = []
    for served in (whole, chunked):
        with grpc.insecure_channel(address(served)) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            replies.append(([stub.Generate(r, timeout=120) for r in requests], stub.Score(score, timeout=120)))
    (generated, scored), (generated_chunked, scored_chunked) = replies
    for one, other in zip(generated, generated_chunked, strict=True):
        assert [list(h.token_ids) for h in one.hypotheses] == [list(h.token_ids) for h in other.hypotheses]
        assert [h.log_prob for h in one.hypotheses] == pytest.approx([h.log_prob for h in other.hypotheses], abs=1e-4)
    for a, b in zip(scored.scores, scored_chunked.scores, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
        assert list(a.passage_posteriors) == pytest.approx(list(b.passage_posteriors), abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cancelled_ask_frees_the_generator_within_one_pass(
    launch: Launcher, tiny: TinyModels, index_root: Path, family: str
) -> None:
    """A heavy Ask (a question of ~8,000 tokens read with 40 passages, then 8 beams of 256 tokens per passage)
    cancelled once the generator has started on it: its work stops at the next pass and the next Ask is
    served. Decoder-only, that is inside the prompt: fewer prompt tokens ran than the request had."""
    stack = launch.stack(
        index_root, "tiny", model_of(tiny, family), max_question_tokens=100_000, max_prompt_tokens=10**8
    )
    ask(stack.gateway_address, NORMAL, timeout=60)
    normal_start = prompt_tokens()
    ask(stack.gateway_address, NORMAL, timeout=60)
    normal_cost = prompt_tokens() - normal_start

    heavy = AskRequest(ASTRAL, 40, DecodingOptions(mode=Mode.SEQUENCE, num_beams=8, max_new_tokens=256))
    question_tokens = len(AutoTokenizer.from_pretrained(tiny.causal_lm)(ASTRAL)["input_ids"])
    before, stops = prompt_tokens(), stopped()
    with grpc.insecure_channel(stack.gateway_address) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Ask.future(heavy.to_pb(), timeout=600)
        wait_for(lambda: prompt_tokens() > before, "the generator never started on the heavy Ask")
        call.cancel()
        wait_for(lambda: stopped() > stops, "the heavy Ask's work ran on after its caller cancelled")
        assert ask(stack.gateway_address, NORMAL).answers  # type: ignore[attr-defined]
    heavy_ran = prompt_tokens() - before - normal_cost
    if family == "decoder-only":
        assert heavy_ran < question_tokens * 40 / 10, "the prompt ran on after its caller cancelled"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ask_cancelled_while_queued_costs_no_model_work(
    launch: Launcher, tiny: TinyModels, index_root: Path, family: str
) -> None:
    """One request at a time: an Ask queued behind a heavy one, cancelled while it waits, is dropped when the model
    comes to it (its prompts never run, so no work of it is stopped), and the Ask after it is answered."""
    stack = launch.stack(
        index_root, "tiny", model_of(tiny, family), max_batch=1, max_question_tokens=100_000, max_prompt_tokens=10**8
    )
    heavy = AskRequest(ASTRAL, 40, DecodingOptions(mode=Mode.SEQUENCE, num_beams=8, max_new_tokens=256))
    before, stops, drops, depth = prompt_tokens(), stopped(), dropped(), queue_depth()
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        running = stub.Ask.future(heavy.to_pb(), timeout=600)
        wait_for(lambda: prompt_tokens() > before, "the generator never started on the heavy Ask")
        queued = stub.Ask.future(NORMAL.to_pb(), timeout=600)
        wait_for(lambda: queue_depth() == depth + 2, "the second Ask never reached the generator's queue")
        queued.cancel()
        wait_for(lambda: queue_depth() == depth + 1, "the generator never saw the queued Ask's caller go")
        running.cancel()
        wait_for(lambda: stopped() > stops, "the heavy Ask's work ran on after its caller cancelled")
        assert stub.Ask(NORMAL.to_pb(), timeout=60).answers  # behind the cancelled one in the queue
    assert dropped() == drops + 1
    assert stopped() == stops + 1, "the cancelled Ask's work started when the model came to it"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ask_past_its_deadline_frees_the_generator(
    launch: Launcher, tiny: TinyModels, index_root: Path, family: str
) -> None:
    """The probe of issue R: a 2,000-character question of astral characters with k = 40 and a 2 s deadline.
    With the default budgets it is refused at once; with the budgets lifted, its work stops at the deadline."""
    refused = launch.stack(index_root, "tiny", model_of(tiny, family))
    heavy = AskRequest(ASTRAL, 40)
    with pytest.raises(grpc.RpcError) as err:
        ask(refused.gateway_address, heavy, timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details(err.value)

    lifted = launch.stack(
        index_root, "tiny", model_of(tiny, family), max_question_tokens=100_000, max_prompt_tokens=10**8
    )
    heavy = AskRequest(ASTRAL, 40, DecodingOptions(mode=Mode.SEQUENCE, num_beams=8, max_new_tokens=256))
    question_tokens = len(AutoTokenizer.from_pretrained(tiny.causal_lm)(ASTRAL)["input_ids"])
    before, stops = prompt_tokens(), stopped()
    with pytest.raises(grpc.RpcError) as err:
        ask(lifted.gateway_address, heavy, timeout=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, details(err.value)
    # Queued behind the heavy Ask: answered once the generator has let go of it.
    assert ask(lifted.gateway_address, NORMAL).answers  # type: ignore[attr-defined]
    started = prompt_tokens() > before + 1000  # the normal Ask's prompts are a few hundred tokens
    assert stopped() > stops or not started  # (a very busy machine may see the deadline pass in the queue)
    if family == "decoder-only":
        assert prompt_tokens() - before < question_tokens * 40 / 2, "the prompt ran on past the deadline"


def test_a_score_past_its_deadline_frees_the_generator(launch: Launcher, tiny: TinyModels) -> None:
    """The probe of issue R: Score with 40 passages and 32 answers of ~250 tokens, 1 s deadline."""
    served = launch.generator(tiny.rag_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny.rag_checkpoint / "generator_tokenizer")
    answer = "penicillin"
    while len(tokenizer(answer + " penicillin")["input_ids"]) <= 250:
        answer += " penicillin"
    answers = [f"{i} {answer}" for i in range(32)]
    request = generator_pb2.ScoreRequest(question="Who?", passages=[p.to_pb() for p in passages(40)], answers=answers)
    total = 40 * 32 * len(tokenizer(answer)["input_ids"])
    before = scored_tokens()
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, details(err.value)
        quick = generator_pb2.GenerateRequest(question="Who?", passages=request.passages[:2])
        assert stub.Generate(quick).hypotheses  # queued behind the Score: answered once it is let go
    assert scored_tokens() - before < total / 2, "the Score ran on past its deadline"
