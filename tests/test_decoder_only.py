"""Decoder-only generators: the same RAG math over a causal chat LM (left-padded prompts, one per passage).

No reference implementation marginalises over passages with a decoder-only LM, so these tests pin it to
what is known: with one passage RAG is plain generation (transformers' `generate` on that prompt); with K
copies of one passage it is unchanged; and the cached decoding path agrees with teacher forcing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer

from generator_svc import precision, rag_math
from generator_svc.families import DecoderOnlyLM, shared_prefix_length
from generator_svc.joint import JointDecoder, Part
from generator_svc.loading import load_passage_lm
from generator_svc.model import DRAFT_CHOICES, RagModel, drafts_for, tokens_per_pass
from generator_svc.passage_cache import DiskTier, PassageKVCache
from generator_svc.passage_lm import PassageLM, one_each
from generator_svc.precision import Dtype, NearTopFloat32Logits, PackedLinear, choose_precision
from generator_svc.requests import Request
from rag.errors import FailedPrecondition, InvalidArgument
from rag.host import cpu_flags
from rag.serving import ServerThread
from rag.types import DecodingOptions, Mode, Passage
from rag.v1 import generator_pb2, generator_pb2_grpc
from rag_cli.testing import random_models
from rag_cli.testing.stack import Launcher, address
from tests.conftest import TinyModels, index_build_args, rag

QUESTION = "Who discovered penicillin?"
PASSAGES = [
    Passage("a", "Alexander Fleming", "Fleming discovered penicillin in 1928 at St Mary's Hospital.", 2.0),
    Passage("b", "Paris", "Paris is the capital and most populous city of France, on the Seine.", 1.0),
    Passage("c", "Everest", "Mount Everest.", 0.5),
]


@pytest.fixture(scope="module")
def lm(tiny: TinyModels) -> DecoderOnlyLM:
    model = load_passage_lm(str(tiny.causal_lm))
    assert isinstance(model, DecoderOnlyLM)
    return model


@pytest.fixture(scope="module")
def stub(loop_thread: ServerThread, tiny: TinyModels) -> Iterator[generator_pb2_grpc.GeneratorServiceStub]:
    launcher = Launcher(loop_thread)
    served = launcher.generator(tiny.causal_lm)
    with grpc.insecure_channel(address(served)) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)
    launcher.close()


def hf_generate(tiny: TinyModels, prompt: list[int], num_beams: int, max_new_tokens: int) -> list[tuple[int, ...]]:
    model = AutoModelForCausalLM.from_pretrained(tiny.causal_lm).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    rows = []
    for row in out[:, len(prompt) :].tolist():
        eos = model.generation_config.eos_token_id
        rows.append(tuple(row[: row.index(eos) + 1] if eos in row else row))
    return rows


@pytest.mark.parametrize("mode", [Mode.TOKEN, Mode.SEQUENCE])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_one_passage_is_plain_generation(lm: DecoderOnlyLM, tiny: TinyModels, mode: Mode, num_beams: int) -> None:
    ctx = lm.encode([QUESTION], [one_each(PASSAGES[:1])])
    options = DecodingOptions(mode=mode, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=10)
    ours = [g.tokens for g in rag_math.generate(lm, ctx, torch.zeros(1, 1), options)[0]]
    assert ours == hf_generate(tiny, lm.prompt_ids(QUESTION, (PASSAGES[0],)), num_beams, 10)


def test_left_padded_passages_decode_as_if_alone(lm: DecoderOnlyLM, tiny: TinyModels) -> None:
    """Each passage row of a batch (prompts of different lengths, left-padded) decodes as its prompt alone."""
    ctx = lm.encode([QUESTION], [one_each(PASSAGES)])
    state = lm.start(ctx, torch.arange(len(PASSAGES)))
    found = rag_math.greedy_search(lambda tokens, _: lm.step(state, tokens), len(PASSAGES), 10, lm.rules)
    for passage, candidates in zip(PASSAGES, found, strict=True):
        assert [candidates[0].tokens] == hf_generate(tiny, lm.prompt_ids(QUESTION, (passage,)), 1, 10)


def test_what_prompts_share_runs_once(lm: DecoderOnlyLM) -> None:
    """The system prompt and chat template that every row starts with run for one row only; the rest of each
    prompt runs once, padded at most 10% (rows are bucketed by length)."""
    fed: list[int] = []
    hook = lm.model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        ctx = lm.encode([QUESTION, "What is the capital of France?"], [one_each(PASSAGES), one_each(PASSAGES)])
    finally:
        hook.remove()
    prompts = [lm.prompt_ids(q, (p,)) for q in (QUESTION, "What is the capital of France?") for p in PASSAGES]
    shared = next(i for i in range(len(prompts[0])) if len({tuple(p[: i + 1]) for p in prompts}) > 1)
    assert shared > 10  # the chat template's system turn, at least
    own = sum(len(p) - shared for p in prompts)
    assert fed[0] == shared and own <= sum(fed[1:]) <= 1.1 * own
    assert ctx.attention_mask.sum(-1).tolist() == [len(p) for p in prompts]


@pytest.mark.parametrize("mode", [generator_pb2.RAG_MODE_TOKEN, generator_pb2.RAG_MODE_SEQUENCE])
def test_copies_of_one_passage_change_nothing(
    stub: generator_pb2_grpc.GeneratorServiceStub, mode: generator_pb2.RagMode.ValueType
) -> None:
    options = generator_pb2.DecodingOptions(mode=mode, num_beams=2, num_return_sequences=2, max_new_tokens=8)
    one = stub.Generate(
        generator_pb2.GenerateRequest(question=QUESTION, passages=[PASSAGES[0].to_pb()], options=options), timeout=60
    )
    three = stub.Generate(
        generator_pb2.GenerateRequest(question=QUESTION, passages=[PASSAGES[0].to_pb()] * 3, options=options),
        timeout=60,
    )
    assert [h.token_ids for h in three.hypotheses] == [h.token_ids for h in one.hypotheses]
    assert [h.log_prob for h in three.hypotheses] == pytest.approx([h.log_prob for h in one.hypotheses], abs=1e-4)
    assert list(three.hypotheses[0].passage_posteriors) == pytest.approx([1 / 3] * 3, abs=1e-4)


def test_greedy_rag_sequence_is_each_passages_answer_ranked_by_its_marginal(
    stub: generator_pb2_grpc.GeneratorServiceStub, lm: DecoderOnlyLM
) -> None:
    """Greedy thorough RAG-Sequence runs as one search (each passage's answer fed under every passage as it is
    chosen): it returns what searching each passage alone and then scoring every answer under every passage
    returns, the same answer, marginal and posterior."""
    passages = [Passage(p.id, p.title, p.text, 1.0) for p in PASSAGES]  # equal scores: a uniform prior
    options = DecodingOptions(Mode.SEQUENCE, num_beams=1, max_new_tokens=10)
    reply = stub.Generate(
        generator_pb2.GenerateRequest(
            question=QUESTION, passages=[p.to_pb() for p in passages], options=options.to_pb()
        ),
        timeout=60,
    )
    ctx = lm.encode([QUESTION], [one_each(passages)])
    state = lm.start(ctx, torch.arange(len(passages)))
    found = rag_math.greedy_search(lambda tokens, _: lm.step(state, tokens), len(passages), 10, lm.rules)
    answers = list(dict.fromkeys(candidates[0].tokens for candidates in found))
    prior = torch.full((1, len(passages)), -math.log(len(passages)))
    scored = rag_math.score_answers(lm, ctx, prior, [0] * len(answers), answers)
    best = int(scored.rag_sequence().argmax())
    (hypothesis,) = reply.hypotheses
    assert tuple(hypothesis.token_ids) == answers[best]
    assert hypothesis.log_prob == pytest.approx(float(scored.rag_sequence()[best]), abs=1e-4)
    assert list(hypothesis.passage_posteriors) == pytest.approx(scored.posterior()[best].tolist(), abs=1e-4)


def test_rows_of_ended_hypotheses_leave_the_passes_they_share(tiny: TinyModels, tmp_path: Path) -> None:
    """Greedy RAG-Sequence stops computing the rows of hypotheses that ended, also in the decoding passes it
    shares with other requests (continuous batching): every request answers what it answers alone."""
    passages = [Passage(p.id, p.title, p.text, 1.0) for p in PASSAGES]
    requests = [
        ("When was it built?", DecodingOptions(Mode.SEQUENCE, max_new_tokens=10)),
        ("What is the capital of France?", DecodingOptions(Mode.TOKEN, max_new_tokens=10)),
        ("Who?", DecodingOptions(Mode.SEQUENCE, max_new_tokens=10)),
    ]
    # A second end-of-sequence token: the second token of one passage's answer to the first question that neither
    # it nor the other passages' answers start with, so that its hypothesis ends at its second step while theirs
    # decode on.
    plain, first = load_passage_lm(str(tiny.causal_lm)), requests[0]
    alone_answers = [
        rag_math.generate(plain, plain.encode([first[0]], [[(p,)]]), torch.zeros(1, 1), first[1])[0][0].tokens
        for p in passages
    ]
    ending = next(
        a[1]
        for a in alone_answers
        if len(a) > 2 and a[0] != a[1] and all(a[1] not in b[:2] for b in alone_answers if b is not a)
    )
    model = tmp_path / "lm"
    shutil.copytree(tiny.causal_lm, model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], ending]
    (model / "generation_config.json").write_text(json.dumps(generation))
    lm = load_passage_lm(str(model))

    def work(question: str, options: DecodingOptions) -> Callable[[PassageLM], Any]:
        def run(model: PassageLM) -> list[rag_math.Generated]:
            ctx = model.encode([question], [one_each(passages)])
            return rag_math.generate(model, ctx, torch.zeros(1, len(passages)), options)[0]

        return run

    alone = [work(q, options)(lm) for q, options in requests]
    joint, kept = JointDecoder(lm), []
    answers: dict[int, tuple[Any, BaseException | None]] = {}
    keep = joint.rows.keep

    def counted(part: Part, index: torch.Tensor) -> None:
        kept.append(len(index))
        keep(part, index)

    joint.rows.keep = counted  # type: ignore[method-assign]
    for i, (q, options) in enumerate(requests):
        joint.add(work(q, options), lambda result=None, error=None, i=i: answers.__setitem__(i, (result, error)))
    while joint.busy:
        joint.advance()
    assert kept  # rows left the union while the others decoded on
    for i, expected in enumerate(alone):
        got, error = answers[i]
        assert error is None
        assert [g.tokens for g in got] == [g.tokens for g in expected]
        assert [g.log_prob for g in got] == pytest.approx([g.log_prob for g in expected], abs=1e-4)
        for a, b in zip(got, expected, strict=True):
            assert a.posterior == pytest.approx(b.posterior, abs=1e-4)


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_cached_decoding_agrees_with_teacher_forcing(family: str, tiny: TinyModels) -> None:
    """The per-step marginal that RAG-Token's search accumulates (KV cache) equals the teacher-forced one."""
    lm: PassageLM = load_passage_lm(str(tiny.causal_lm if family == "decoder-only" else tiny.rag_checkpoint))
    ctx = lm.encode([QUESTION, "What is the capital of France?"], [one_each(PASSAGES), one_each(PASSAGES[::-1])])
    prior = rag_math.log_prior(torch.tensor([[2.0, 1.0, 0.5], [0.5, 1.0, 2.0]]))
    K = len(PASSAGES)
    state = lm.start(ctx, torch.arange(2 * K))

    def marginal(tokens: torch.Tensor | None, _: object) -> torch.Tensor:
        per_passage = lm.step(state, None if tokens is None else tokens.repeat_interleave(K)).view(2, K, -1)
        return torch.logsumexp(prior[:, :, None] + per_passage, dim=1)

    found = rag_math.greedy_search(marginal, 2, 12, lm.rules)
    answers = [found[0][0].tokens, found[1][0].tokens]
    scored = rag_math.score_answers(lm, ctx, prior, [0, 1], answers).rag_token()
    assert scored.tolist() == pytest.approx([found[0][0].log_prob, found[1][0].log_prob], abs=1e-4)


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_beams_read_their_passages_in_place(family: str, tiny: TinyModels) -> None:
    """Decoder rows keep only the tokens they decoded: prompts and cross-attention stay one row per passage,
    however many beams read them and however beams reorder, and the log-probabilities equal teacher forcing
    over each row's whole input (transformers' own attention, nothing shared)."""
    lm: PassageLM = load_passage_lm(str(tiny.causal_lm if family == "decoder-only" else tiny.rag_checkpoint))
    K, N = len(PASSAGES), 2
    ctx = lm.encode([QUESTION], [one_each(PASSAGES)])
    state = lm.start(ctx, torch.arange(K).repeat(N))  # RAG-Token's layout: row n*K + k is beam n, passage k
    torch.manual_seed(0)
    history = torch.empty(N * K, 0, dtype=torch.long)
    logprobs = lm.step(state, None)
    for swap in (False, True, False):
        if swap:  # beam 0 continues beam 1's history and the other way round
            order = torch.arange(N * K).view(N, K).flip(0).reshape(-1)
            lm.reorder(state, order)
            history = history[order]
        tokens = torch.randint(3, logprobs.shape[-1], (N,)).repeat_interleave(K)
        history = torch.cat([history, tokens[:, None]], 1)
        logprobs = lm.step(state, tokens)
    own = state.cache.self_attention_cache if isinstance(state.cache, EncoderDecoderCache) else state.cache
    starts = 1 if family == "encoder-decoder" else 0  # the decoder start token, one per row
    assert own.get_seq_length() == starts + history.shape[1]
    if ctx.cross is not None:  # the encoder side, once per passage: the very tensors encoding made
        assert isinstance(state.cache, EncoderDecoderCache)
        layers = state.cache.cross_attention_cache.layers
        assert all(isinstance(layer, DynamicLayer) for layer in layers)
        kept = [layer.keys for layer in layers if isinstance(layer, DynamicLayer)]
        assert all(a is b for a, b in zip(kept, [k for k, _ in ctx.cross], strict=True))
    targets = torch.cat([history, logprobs.argmax(-1, keepdim=True)], 1).view(N, K, -1)[:, 0]
    forced = lm.teacher_forced([QUESTION] * N, [one_each(PASSAGES)] * N, targets)  # [N, K, T]
    assert logprobs.gather(1, targets.repeat_interleave(K, 0)[:, -1:]).view(N, K).tolist() == [
        pytest.approx(row, abs=1e-4) for row in forced[:, :, -1].tolist()
    ]
    # Rows that read passages unequally often (answers of two questions, 1 and 2 of them) read them as well.
    ctx2 = lm.encode([QUESTION, "Where is Paris?"], [one_each(PASSAGES), one_each(PASSAGES)])
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 5])
    answers = torch.cat([targets[:1], targets], 0).repeat_interleave(K, 0)
    scored = lm.token_logprobs(ctx2, rows, answers).view(3, K, -1)
    forced2 = lm.teacher_forced(
        [QUESTION, "Where is Paris?", "Where is Paris?"], [one_each(PASSAGES)] * 3, answers[::K]
    )
    assert scored.tolist() == [[pytest.approx(r, abs=1e-4) for r in row] for row in forced2.tolist()]
    # Answers of other lengths (run in buckets of like length): their own positions the same, 0 past them.
    T = answers.shape[1]
    lengths = [1 + r % T for r in range(len(rows))]
    short = lm.token_logprobs(ctx2, rows, answers, lengths)
    real = torch.arange(T) < torch.tensor(lengths)[:, None]
    assert torch.equal(short[~real], torch.zeros(int((~real).sum())))
    assert short[real].tolist() == pytest.approx(scored.view(len(rows), T)[real].tolist(), abs=1e-4)


def test_a_model_whose_attention_skips_the_shared_context_is_refused(tiny: TinyModels) -> None:
    """Decoding without the prompt would answer from nothing: a model whose layers do not read the shared context
    (its attention set back to plain SDPA here) fails with a reason instead."""
    lm = load_passage_lm(str(tiny.causal_lm))
    lm.model.set_attn_implementation("sdpa")
    ctx = lm.encode([QUESTION], [one_each(PASSAGES)])
    prior = rag_math.log_prior(torch.tensor([[2.0, 1.0, 0.5]]))
    with pytest.raises(FailedPrecondition, match="attention interface"):
        rag_math.generate(lm, ctx, prior, DecodingOptions(max_new_tokens=4))


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_greedy_rag_token_scores_its_answers_from_the_search_itself(family: str, tiny: TinyModels) -> None:
    """No pass after the search: its own per-passage log-probabilities give the marginal and the posterior,
    which equal a teacher-forced scoring of the same answers."""
    lm: PassageLM = load_passage_lm(str(tiny.causal_lm if family == "decoder-only" else tiny.rag_checkpoint))
    ctx = lm.encode([QUESTION, "What is the capital of France?"], [one_each(PASSAGES), one_each(PASSAGES[::-1])])
    prior = rag_math.log_prior(torch.tensor([[2.0, 1.0, 0.5], [0.5, 1.0, 2.0]]))
    passes: list[object] = []
    hook = lm.model.register_forward_hook(lambda *_: passes.append(None))
    try:
        found = rag_math.generate(lm, ctx, prior, DecodingOptions(mode=Mode.TOKEN, max_new_tokens=8))
    finally:
        hook.remove()
    answers = [found[0][0].tokens, found[1][0].tokens]
    assert len(passes) == max(len(a) for a in answers) - 1  # one per token fed; the first came with encoding
    scored = rag_math.score_answers(lm, ctx, prior, [0, 1], answers)
    assert [g[0].log_prob for g in found] == pytest.approx(scored.rag_token().tolist(), abs=1e-4)
    assert [list(g[0].posterior) for g in found] == [pytest.approx(p, abs=1e-4) for p in scored.posterior().tolist()]


@pytest.fixture(scope="module")
def peaked_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat LM whose next-token distributions have clear favourites (the default one's are nearly flat)."""
    return random_models.save_causal_lm(tmp_path_factory.mktemp("peaked") / "lm", hidden=64, init_std=1.0)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_lower_precision_agrees_with_float32_where_the_choice_is_clear(
    tiny: TinyModels, peaked_lm: Path, family: str, dtype: str
) -> None:
    spec = str(peaked_lm if family == "decoder-only" else tiny.rag_checkpoint)
    reference, lowered = load_passage_lm(spec), load_passage_lm(spec, Dtype.parse(dtype))
    questions = [QUESTION, "What is the capital of France?", "How high is Mount Everest?"]
    contexts = [one_each(PASSAGES), one_each(PASSAGES[::-1]), one_each(PASSAGES[1:] + PASSAGES[:1])]
    exact = reference.encode(questions, contexts).first_logprobs
    approximate = lowered.encode(questions, contexts).first_logprobs
    assert approximate.dtype == torch.float32  # log-probabilities stay float32 whatever the weights
    # A choice is clear when float32's favourite leads by more than this precision can blur: a share of the
    # logits' spread (bfloat16 keeps 8 bits of mantissa; int8 quantises each activation tensor to 8 bits).
    best, spread = exact.topk(2).values, -exact.min(-1).values
    clear = best[:, 0] - best[:, 1] > {"bfloat16": 0.02, "int8": 0.05}[dtype] * spread
    assert clear.sum() >= 2
    assert torch.equal(exact.argmax(-1)[clear], approximate.argmax(-1)[clear])
    assert not torch.equal(exact, approximate)  # the weights really are in another precision
    if dtype == "bfloat16":  # the logits that decide are not rounded to 8 bits (see the test below)
        assert isinstance(lowered.model.get_output_embeddings(), NearTopFloat32Logits)
        assert lowered.model.get_output_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_bfloat16_logits_are_float32s_wherever_they_can_decide(rows: int) -> None:
    """A bfloat16 model's vocabulary projection runs in bfloat16, then recomputes in float32 every token within
    ln(rows) of a row's top (any token a row's or a mixture of rows' argmax can pick), for all rows."""
    torch.manual_seed(rows)
    head = torch.nn.Linear(64, 4000, bias=False).to(torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.5)  # logits of 10-40, where bfloat16's step is 0.0625-0.25
    exact_head = torch.nn.Linear(64, 4000, bias=False).to(torch.bfloat16)
    exact_head.weight = head.weight
    head.__class__ = NearTopFloat32Logits
    x = torch.randn(rows, 1, 64).to(torch.bfloat16)
    with torch.no_grad():
        served, rounded = head(x), exact_head(x).float()
    exact = x.float() @ head.weight.float().T  # float32 arithmetic on the same bfloat16 numbers
    assert served.dtype == torch.float32 and served.shape == exact.shape
    near_top = (exact >= exact.amax(-1, keepdim=True) - math.log(rows)).any(1).any(0)  # any row's, for every row
    assert torch.allclose(served[..., near_top], exact[..., near_top], rtol=0, atol=1e-5)
    assert not torch.allclose(rounded[..., near_top], exact[..., near_top], rtol=0, atol=1e-5)  # rounding mattered
    assert torch.equal(served.argmax(-1), exact.argmax(-1))
    assert (served - exact).abs().max() <= exact.abs().max() * 2.0**-8  # the rest: bfloat16's rounding at most


def test_the_generator_serves_int8(launch: Launcher, tiny: TinyModels) -> None:
    served = launch.generator(tiny.causal_lm, dtype="int8")
    with grpc.insecure_channel(address(served)) as channel:
        reply = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(
            generator_pb2.GenerateRequest(
                question=QUESTION,
                passages=[p.to_pb() for p in PASSAGES],
                options=generator_pb2.DecodingOptions(max_new_tokens=6),
            ),
            timeout=60,
        )
    assert reply.hypotheses and math.isfinite(reply.hypotheses[0].log_prob)
    assert sum(reply.passage_priors) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(
    ("flags", "dtype", "basis"),
    [
        ({"avx2", "amx_bf16", "avx512_bf16"}, "bfloat16", "native_bfloat16"),  # Intel Xeon from Sapphire Rapids
        ({"avx2", "avx512_bf16"}, "bfloat16", "native_bfloat16"),  # AMD EPYC from Zen 4
        ({"avx2", "avx512f"}, "float32", "no_native_bfloat16"),  # AMD EPYC before Zen 4, older Xeons
        (set(), "float32", "no_native_bfloat16"),
    ],
)
def test_auto_precision_follows_the_cpus_flags_and_the_quality_rule(
    flags: set[str], dtype: str, basis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = choose_precision(Dtype.AUTO, torch.device("cpu"), flags)
    assert (chosen.dtype.value, chosen.basis) == (dtype, basis)
    monkeypatch.setattr(precision, "BFLOAT16_KEEPS_QUALITY", {"RAG-Token": True, "RAG-Sequence": False})
    failing = choose_precision(Dtype.AUTO, torch.device("cpu"), flags)  # were bfloat16 to fail the rule in a mode
    assert failing.dtype is Dtype.FLOAT32
    assert failing.basis == ("no_native_bfloat16" if dtype == "float32" else "bfloat16_below_quality_rule")
    assert choose_precision(Dtype.INT8, torch.device("cpu"), flags).basis == "asked"
    with pytest.raises(InvalidArgument, match="dtype must be one of auto, float32, bfloat16, int8"):
        Dtype.parse("float16")


def test_the_generator_says_which_precision_auto_chose_and_why(
    launch: Launcher, tiny: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import REGISTRY

    native = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    expected, basis = ("bfloat16", "native_bfloat16") if native else ("float32", "no_native_bfloat16")
    with caplog.at_level(logging.INFO, logger="generator_svc.server"):
        served = launch.generator(tiny.causal_lm, dtype="auto", draft_tokens=-1)
    assert REGISTRY.get_sample_value("rag_generator_precision_info", {"dtype": expected, "basis": basis}) == 1
    [loaded] = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert f"{expected} on cpu: auto: " in loaded, loaded
    # Drafting, too, is chosen here when not asked for: by timing passes over more positions in the warm-up
    [drafting] = [m for m in caplog.messages if m.startswith("greedy search verifies")]
    measured = r"greedy search verifies (\d+) drafted tokens per pass \(measured: passes over 2.* of 25 rows took .*\)"
    chosen = re.fullmatch(measured, drafting)
    assert chosen, drafting
    assert REGISTRY.get_sample_value("rag_generator_draft_tokens") == int(chosen.group(1))
    with grpc.insecure_channel(address(served)) as channel:
        reply = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(
            generator_pb2.GenerateRequest(question=QUESTION, passages=[p.to_pb() for p in PASSAGES]), timeout=60
        )
    assert reply.hypotheses


def test_drafting_pays_where_more_positions_cost_little_and_not_where_they_cost_their_arithmetic() -> None:
    """What the warm-up's timings choose: as many drafts as yield most where a pass costs the same over 9
    positions as over 1 (a weight-bound GPU step); a few where each position adds 5%; none where passes grow as
    the demo model's did on 2 cores of an AMD EPYC (68, 87, 113, 127, 177, 227 ms over 1, 2, 3, 4, 6, 9 positions),
    nor where drafting would save less than a tenth."""
    flat = dict.fromkeys(DRAFT_CHOICES, 0.05)
    assert drafts_for(flat) == max(DRAFT_CHOICES)
    assert 0 < drafts_for({d: 0.05 * (1 + 0.05 * d) for d in DRAFT_CHOICES}) < max(DRAFT_CHOICES)
    epyc = dict(zip(DRAFT_CHOICES, (0.068, 0.087, 0.113, 0.127, 0.177, 0.227), strict=True))
    assert drafts_for(epyc) == 0
    assert drafts_for({0: 0.068, 1: 0.068 * tokens_per_pass(1) / 1.05}) == 0  # 5% faster a token: not worth it
    assert tokens_per_pass(0) == 1 and tokens_per_pass(1) == pytest.approx(11.6 / 8.7, rel=0.02)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_the_generator_warms_up_before_it_reports_serving(launch: Launcher, tiny: TinyModels, family: str) -> None:
    """Both RAG modes run once while loading, so that the first Ask after SERVING is not the one paying for the
    process's first passes (the demo's first question took 33 s, the next ones 2.4-2.9 s)."""
    from prometheus_client import REGISTRY

    ran = lambda: REGISTRY.get_sample_value("rag_generator_model_tokens_total", {"pass": "prompt"}) or 0.0  # noqa: E731
    spec = tiny.causal_lm if family == "decoder-only" else tiny.rag_checkpoint
    before = ran()
    launch.generator(spec, warm_up=False)
    assert ran() == before
    launch.generator(spec)  # returns once SERVING, no request sent
    assert ran() > before


def kv_lookups(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("rag_generator_kv_cache_lookups_total", {"outcome": outcome}) or 0.0


def ask_cache_probes(served: Any) -> list[Any]:
    """Nine decodes (both RAG modes, greedy and beams; passages in three orders and subsets) and a Score."""
    questions = [QUESTION, "What is the capital of France?", "How high is Mount Everest?"]
    requests = [
        generator_pb2.GenerateRequest(question=q, passages=[p.to_pb() for p in passages], options=options.to_pb())
        for q, passages in zip(questions, (PASSAGES, PASSAGES[::-1], PASSAGES[1:]), strict=True)
        for options in (
            DecodingOptions(mode=Mode.TOKEN, max_new_tokens=6),
            DecodingOptions(mode=Mode.TOKEN, num_beams=2, max_new_tokens=6),
            DecodingOptions(mode=Mode.SEQUENCE, num_beams=2, max_new_tokens=6),
        )
    ]
    score = generator_pb2.ScoreRequest(question=QUESTION, passages=[p.to_pb() for p in PASSAGES], answers=["Fleming"])
    with grpc.insecure_channel(address(served)) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        return [stub.Generate(r, timeout=60) for r in requests] + [stub.Score(score, timeout=60)]


def assert_same_hypotheses(reference: Any, reply: Any) -> None:
    """Two replies (GenerateReply or Answered): the same tokens, log-probabilities and posteriors within float
    error."""
    assert [list(h.token_ids) for h in reference.hypotheses] == [list(h.token_ids) for h in reply.hypotheses]
    for a, b in zip(reference.hypotheses, reply.hypotheses, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)
        assert list(a.passage_posteriors) == pytest.approx(list(b.passage_posteriors), abs=1e-4)


def assert_same_replies(reference: list[Any], replies: list[Any]) -> None:
    for ref, got in zip(reference[:-1], replies[:-1], strict=True):
        assert_same_hypotheses(ref, got)
    assert replies[-1].scores[0].log_prob == pytest.approx(reference[-1].scores[0].log_prob, abs=1e-4)


def test_the_passage_kv_cache_changes_no_token_score_or_posterior(launch: Launcher, peaked_lm: Path) -> None:
    """RAG rows read their passage segments from the cache (the second round: every one a hit) and give what
    the uncached path gives: the same tokens, log-probabilities, posteriors and Score results."""
    from prometheus_client import REGISTRY

    plain, cached = launch.generator(peaked_lm, kv_cache_mb=0), launch.generator(peaked_lm, kv_cache_mb=64)
    reference, first = ask_cache_probes(plain), ask_cache_probes(cached)
    after_first = kv_lookups("hit"), kv_lookups("miss")
    second = ask_cache_probes(cached)
    assert kv_lookups("miss") == after_first[1]  # the second round runs no segment: every one is cached
    assert kv_lookups("hit") - after_first[0] == 3 * (3 + 3 + 2) + 3  # every passage of 9 decodes and a Score
    assert (REGISTRY.get_sample_value("rag_generator_kv_cache_bytes") or 0) > 0
    for replies in (first, second):
        assert_same_replies(reference, replies)


def test_the_kv_cache_disk_tier_serves_a_restarted_generator_exactly(
    launch: Launcher, peaked_lm: Path, tmp_path: Path
) -> None:
    """Segments one generator ran are read from its --kv-cache-dir by a new generator over the same directory (a
    restart, or another replica on the volume): none runs again, and tokens, scores and posteriors are the
    uncached path's. A torn file is a miss: removed, run and written whole again."""
    settings = {"kv_cache_mb": 64, "kv_cache_dir": str(tmp_path), "warm_up": False}
    reference = ask_cache_probes(launch.generator(peaked_lm, kv_cache_mb=0))
    misses = kv_lookups("miss")
    assert_same_replies(reference, ask_cache_probes(launch.generator(peaked_lm, **settings)))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert files and len(files) == kv_lookups("miss") - misses  # every segment run, written once

    misses, from_disk = kv_lookups("miss"), kv_lookups("disk")
    assert_same_replies(reference, ask_cache_probes(launch.generator(peaked_lm, **settings)))
    assert kv_lookups("miss") == misses  # the restarted generator ran no segment
    assert kv_lookups("disk") - from_disk == len(files)  # each read from disk once, then from memory

    whole = files[0].stat().st_size
    files[0].write_bytes(files[0].read_bytes()[: whole // 2])
    misses = kv_lookups("miss")
    assert_same_replies(reference, ask_cache_probes(launch.generator(peaked_lm, **settings)))
    assert kv_lookups("miss") == misses + 1 and files[0].stat().st_size == whole

    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    served = launch.generator(peaked_lm, **{**settings, "kv_cache_dir": str(not_a_directory / "kv")})
    assert served.loading is not None and "--kv-cache-dir" in str(served.loading.exception())


def test_the_passage_kv_cache_serves_batches_of_questions_exactly(peaked_lm: Path) -> None:
    """Questions decoded together (the worker's batches) read their segments from the cache, each row padded
    between the fixed prefix and its segment, and decode what they decode uncached."""
    plain = RagModel(load_passage_lm(str(peaked_lm)))
    cached = RagModel(load_passage_lm(str(peaked_lm), kv_cache_bytes=2**26))
    for mode, beams in ((Mode.TOKEN, 1), (Mode.TOKEN, 2), (Mode.SEQUENCE, 2)):
        options = DecodingOptions(mode=mode, num_beams=beams, max_new_tokens=8).with_defaults(8, 1.0)
        batch = [Request(QUESTION, PASSAGES, options), Request("How high is it?", PASSAGES[::-1], options)]
        for _ in range(2):  # segments run, then cached
            for a, b in zip(plain.generate(batch), cached.generate(batch), strict=True):
                assert [h.token_ids for h in a.hypotheses] == [h.token_ids for h in b.hypotheses]
                assert [h.log_prob for h in a.hypotheses] == pytest.approx([h.log_prob for h in b.hypotheses], abs=1e-4)
    assert isinstance(cached.lm, DecoderOnlyLM) and cached.lm.passage_cache is not None
    assert len(cached.lm.passage_cache) >= len(PASSAGES)


def test_a_segment_cached_after_a_longer_fixed_prefix_is_another_entry(tiny: TinyModels) -> None:
    """Where a passage's first characters merge with the template's last token ("Everest" here), the prompts of a
    request holding it share fewer tokens, so every segment of that request starts a token earlier: a segment
    cached by a request without it is another entry there (it was misread, a token short, before)."""
    plain = RagModel(load_passage_lm(str(tiny.causal_lm)))
    cached_lm = load_passage_lm(str(tiny.causal_lm), kv_cache_bytes=2**26)
    assert isinstance(cached_lm, DecoderOnlyLM)
    cached = RagModel(cached_lm)
    prompts = [cached_lm.prompt_ids(QUESTION, (p,)) for p in PASSAGES]
    assert shared_prefix_length(prompts[:2]) > shared_prefix_length(prompts)
    options = DecodingOptions(mode=Mode.SEQUENCE, max_new_tokens=8).with_defaults(8, 1.0)
    cached.generate([Request(QUESTION, PASSAGES[:2], options)])  # caches two segments after the longer prefix
    request = [Request(QUESTION, PASSAGES, options)]
    ((expected,), (got,)) = plain.generate(request), cached.generate(request)
    assert_same_hypotheses(expected, got)


def test_the_passage_kv_cache_keeps_to_its_budget() -> None:
    cache = PassageKVCache(budget_bytes=3 * 2 * 4 * 10, namespace="m|float32")  # three entries of 10 floats a side
    entry = lambda: [(torch.zeros(1, 1, 10, 1), torch.zeros(1, 1, 10, 1))]  # noqa: E731
    keys = [cache.key([1, 2, i], 1) for i in range(4)]
    assert len(set(keys)) == 4 and cache.key([1, 2, 0], 1) == keys[0]
    assert cache.key([1, 2, 0], 2) != keys[0]  # where the cached part begins is part of the key
    assert PassageKVCache(1, "other|float32").key([1, 2, 0], 1) != keys[0]  # the namespace is part of the key
    for key in keys[:3]:
        cache.put(key, entry())
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[3], entry())  # evicts the least recently used: keys[1]
    assert len(cache) == 3 and cache.get(keys[1]) is None and cache.get(keys[0]) is not None


def test_rag_index_build_kv_cache_fills_the_disk_tier_so_a_new_generator_runs_no_passage(
    launch: Launcher, tiny: TinyModels, corpus: Path, tmp_path: Path
) -> None:
    """`rag index build --kv-cache DIR` runs every passage of the new version into DIR; a generator that has never
    seen them, serving over DIR, reads each instead of running it and answers what an uncached generator does. A
    second build of the same passages runs none."""
    kv, root = tmp_path / "kv", tmp_path / "indexes"
    fill = ["--no-progress", "--kv-cache", str(kv), "--generator", str(tiny.causal_lm), "--generator-dtype", "float32"]
    built = rag(*index_build_args(corpus, root, "kb", tiny.encoder_spec, *fill))
    assert built.returncode == 0, built.stderr[-2000:]
    said = re.search(r"passage KV cache in \S+: (\d+) passage segments run, 0 there already", built.stderr)
    assert said, built.stderr[-2000:]
    ran = int(said.group(1))
    assert ran > 0 and len(list(kv.rglob("*.safetensors"))) == ran
    with sqlite3.connect(root / "kb" / "v1" / "shard-0" / "passages.sqlite") as db:
        rows = db.execute("SELECT id, title, text FROM passages WHERE title IN ('Topic 3', 'Topic 7', 'Topic 12')")
        passages = [Passage(*row) for row in rows]
    assert len(passages) == 3
    request = generator_pb2.GenerateRequest(
        question=QUESTION,
        passages=[p.to_pb() for p in passages],
        options=DecodingOptions(mode=Mode.SEQUENCE, num_beams=2, max_new_tokens=6).to_pb(),
    )

    def generate(served: Any) -> Any:
        with grpc.insecure_channel(address(served)) as channel:
            return generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=60)

    reference = generate(launch.generator(tiny.causal_lm, kv_cache_mb=0))
    misses, from_disk = kv_lookups("miss"), kv_lookups("disk")
    filled = generate(launch.generator(tiny.causal_lm, kv_cache_mb=64, kv_cache_dir=str(kv), warm_up=False))
    assert kv_lookups("miss") == misses and kv_lookups("disk") - from_disk == 3
    assert_same_hypotheses(reference, filled)

    again = rag(*index_build_args(corpus, root, "kb", tiny.encoder_spec, *fill))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"0 passage segments run, {ran} there already" in again.stderr


def test_the_kv_cache_disk_tier_keeps_to_its_budget_least_recently_read_out_first(tmp_path: Path) -> None:
    entry = lambda i: [(torch.full((1, 1, 10, 1), float(i)), torch.zeros(1, 1, 10, 1))]  # noqa: E731
    keys = [bytes([i]) * 32 for i in range(3)]
    disk = DiskTier(tmp_path, budget_bytes=2**20, namespace="m|float32", device=torch.device("cpu"))
    disk.put(keys[0], entry(0))
    budget = 2 * next(disk.directory.glob("*.safetensors")).stat().st_size  # two entries' files
    disk.put(keys[1], entry(1))
    os.utime(disk.directory / f"{keys[1].hex()}.safetensors", (0, 0))  # as if read long ago
    again = DiskTier(tmp_path, budget, namespace="m|float32", device=torch.device("cpu"))
    assert len(again) == 2 and len(DiskTier(tmp_path, budget, "other|float32", torch.device("cpu"))) == 0
    again.put(keys[2], entry(2))  # over budget: the least recently read goes, by its file's time
    assert again.get(keys[1]) is None and len(list(again.directory.glob("*.safetensors"))) == 2
    hit = again.get(keys[0])
    assert hit is not None and torch.equal(hit[0][0], entry(0)[0][0])


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_products_compute_what_linear_layers_do(
    tiny: TinyModels, tmp_path: Path, dtype: str, tied: bool
) -> None:
    """Served on a CPU, every Linear layer multiplies by its weight packed in oneDNN's layout (an untied vocabulary
    projection too; a tied one by a packed copy beside the embeddings): the Linear layers' results, for any number
    of rows, and the same logits as the unpacked model. Nothing it keeps is read from the weights file's mapping,
    which would hold every page packing read."""
    generator = tiny.causal_lm if tied else random_models.save_causal_lm(tmp_path / "untied", tied=False)
    packed = load_passage_lm(str(generator), Dtype.parse(dtype))
    plain = load_passage_lm(str(generator), Dtype.parse(dtype), packed=False)

    def in_file(lm: PassageLM) -> bool:
        mapped = _file_mappings(generator / "model.safetensors")
        kept = [*lm.model.parameters(), *lm.model.buffers()]
        return any(start <= t.data_ptr() < end for t in kept for start, end in mapped)

    assert not in_file(packed) and in_file(plain) == (dtype == "float32")  # unpacked float32 reads the mapping
    layers = [m for m in packed.model.modules() if isinstance(m, PackedLinear)]
    linears = [m for m in plain.model.modules() if isinstance(m, torch.nn.Linear)]  # the head included
    assert len(layers) == len(linears) and not any(type(m) is torch.nn.Linear for m in packed.model.modules())
    head = packed.model.get_output_embeddings()
    if tied or dtype == "bfloat16":  # the weight stays (the embeddings; NearTopFloat32Logits reads it), packed beside
        assert isinstance(head.packed, PackedLinear)
        assert (head.weight is packed.model.get_input_embeddings().weight) == tied
    else:
        assert isinstance(head, PackedLinear)
    torch.manual_seed(0)
    weight, bias = linears[0].weight, linears[0].bias
    for rows in (1, 2, 5, 11, 40):
        x = torch.randn(rows, 1, weight.shape[1]).to(weight.dtype)
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(PackedLinear(weight, bias)(x), expected, atol=1e-5, rtol=1e-5)
    questions = [QUESTION, "How high is Mount Everest?"]
    contexts = [one_each(PASSAGES), one_each(PASSAGES[::-1])]
    torch.testing.assert_close(
        packed.encode(questions, contexts).first_logprobs, plain.encode(questions, contexts).first_logprobs,
        atol=1e-4, rtol=0,
    )  # fmt: skip
    packed.model.requires_grad_(True)  # as a trainer would: a packed weight cannot learn, and says so
    with pytest.raises(RuntimeError, match="packed=False"):
        packed.teacher_forced(questions, contexts, torch.tensor([[5, 6], [7, 8]]))
