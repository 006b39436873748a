"""Our RAG math against transformers' own RagTokenForGeneration / RagSequenceForGeneration.

Tiny random BART + DPR checkpoints in the facebook/rag-* layout; the same passages and doc scores go to
both. transformers gets HF's own input convention (`title / text // question`, padded to 300 tokens,
question-major rows), built here independently of the service's code. Our side runs through the
GeneratorService over gRPC (one question per request) and through the batched math (two questions at once).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoTokenizer, RagSequenceForGeneration, RagTokenForGeneration

from generator_svc import rag_math
from generator_svc.loading import load_passage_lm
from generator_svc.passage_lm import one_each
from rag.serving import ServerThread
from rag.types import DecodingOptions, Mode, Passage, SequenceDecoding
from rag.v1 import generator_pb2, generator_pb2_grpc, passage_pb2
from rag_cli.testing import random_models
from rag_cli.testing.hf_reference import generated_tokens, mask_rag_sequence_padding
from rag_cli.testing.stack import Launcher, address

K = 4
MAX_NEW_TOKENS = 12
QUESTIONS = ["who discovered penicillin?", "what is the capital of france?"]
SCORES = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.5, 2.5, 1.5, 2.0]])
# Generation rules facebook/rag-* checkpoints carry (BART-large's), to prove we honour them as transformers does.
RULES: dict[str, dict[str, object]] = {
    "default": {},
    "bart-large-like": {
        "num_beams": 4,
        "no_repeat_ngram_size": 2,
        "early_stopping": True,
        "length_penalty": 0.6,
        "forced_bos_token_id": 0,
    },
    # A second end-of-sequence token, one these weights choose after a few steps from some passages: greedy
    # RAG-Sequence's hypotheses end at different steps, and those that cannot win are ruled out before their end.
    "early-ends": {"eos_token_id": [2, 325]},
}


def passages_for(b: int) -> list[Passage]:
    return [
        Passage(
            f"q{b}p{k}", f"Title {b}-{k}", f"passage {k} tells about subject {b} " * (k + 1), score=float(SCORES[b, k])
        )
        for k in range(K)
    ]


class Reference:
    """transformers' implementation over one checkpoint, plus our GeneratorService over the same one."""

    def __init__(self, checkpoint: Path, rules: Mapping[str, object], address: str) -> None:
        self.rag_token = RagTokenForGeneration.from_pretrained(checkpoint).eval()
        self.rag_sequence = RagSequenceForGeneration.from_pretrained(checkpoint).eval()
        for key, value in rules.items():  # RagSequence decodes with the generator's own generation config
            setattr(self.rag_sequence.generator.generation_config, key, value)
        mask_rag_sequence_padding(self.rag_sequence)  # transformers 5 dropped it; see rag_cli.testing.hf_reference
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint / "generator_tokenizer")
        # RagRetriever.postprocess_docs: title + " / " + text + " // " + question, double spaces collapsed.
        texts = [
            f"{p.title} / {p.text} // {q}".replace("  ", " ") for b, q in enumerate(QUESTIONS) for p in passages_for(b)
        ]
        batch = self.tokenizer(texts, max_length=300, padding="max_length", truncation=True, return_tensors="pt")
        self.context = {
            "context_input_ids": batch["input_ids"],
            "context_attention_mask": batch["attention_mask"],
            "doc_scores": SCORES,
            "n_docs": K,
        }
        self.stub = generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(address))
        self.checkpoint = checkpoint

    def hf_generate(self, mode: Mode, num_beams: int, num_return: int) -> list[tuple[int, ...]]:
        with torch.no_grad():
            if (
                mode is Mode.TOKEN
            ):  # RagTokenForGeneration.generate ignores max_new_tokens; max_length counts the start token
                rows = self.rag_token.generate(
                    **self.context, num_beams=num_beams, num_return_sequences=num_return, max_length=MAX_NEW_TOKENS + 1
                )
            else:
                rows = self.rag_sequence.generate(
                    **self.context, num_beams=num_beams, num_return_sequences=num_return, max_new_tokens=MAX_NEW_TOKENS
                )
        return generated_tokens(rows, self.rag_token.config.generator.pad_token_id)

    def hf_nll(self, model: Any, b: int, answers: list[list[int]], **get_nll: Any) -> torch.Tensor:
        """transformers' -log p(y|x) of each answer (token ids) to question b: labels are the decoder start plus
        the answer, padded (get_nll shifts them left itself)."""
        start, pad = model.config.generator.decoder_start_token_id, model.config.generator.pad_token_id
        labels = torch.full((len(answers), 1 + max(map(len, answers))), pad)
        for i, ids in enumerate(answers):
            labels[i, 0] = start
            labels[i, 1 : 1 + len(ids)] = torch.tensor(ids)
        rows, scores = slice(b * K, (b + 1) * K), SCORES[b : b + 1].repeat(len(answers), 1)
        with torch.no_grad():
            out = model(
                context_input_ids=self.context["context_input_ids"][rows].repeat(len(answers), 1),
                context_attention_mask=self.context["context_attention_mask"][rows].repeat(len(answers), 1),
                doc_scores=scores,
                decoder_input_ids=labels,
                n_docs=K,
            )
            return model.get_nll(out.logits, scores, labels, n_docs=K, **get_nll)

    def ours_over_grpc(self, options: generator_pb2.DecodingOptions) -> list[tuple[int, ...]]:
        found = []
        for b, question in enumerate(QUESTIONS):
            passages = [
                passage_pb2.Passage(id=p.id, title=p.title, text=p.text, score=p.score) for p in passages_for(b)
            ]
            reply = self.stub.Generate(
                generator_pb2.GenerateRequest(question=question, passages=passages, options=options), timeout=120
            )
            found += [tuple(h.token_ids) for h in reply.hypotheses]
        return found


@pytest.fixture(scope="module", params=list(RULES))
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, loop_thread: ServerThread
) -> Iterator[Reference]:
    checkpoint = tmp_path_factory.mktemp("rag") / "checkpoint"
    random_models.save_rag_checkpoint(checkpoint, n_docs=K, generation=RULES[request.param])
    launcher = Launcher(loop_thread)
    served = launcher.generator(checkpoint)
    yield Reference(checkpoint, RULES[request.param], address(served))
    launcher.close()


THOROUGH = SequenceDecoding.THOROUGH
CASES = [
    (Mode.TOKEN, THOROUGH, 1, 1),  # RAG-Token greedy
    (Mode.TOKEN, THOROUGH, 4, 2),  # RAG-Token beam search
    (Mode.SEQUENCE, THOROUGH, 1, 1),  # RAG-Sequence thorough, greedy per passage
    (Mode.SEQUENCE, THOROUGH, 4, 2),  # RAG-Sequence thorough, beam search per passage
]


@pytest.mark.parametrize(("mode", "decoding", "num_beams", "num_return"), CASES)
def test_generate_matches_transformers_token_for_token(
    reference: Reference, mode: Mode, decoding: SequenceDecoding, num_beams: int, num_return: int
) -> None:
    expected = reference.hf_generate(mode, num_beams, num_return)
    options = DecodingOptions(mode, decoding, num_beams, num_return, MAX_NEW_TOKENS).to_pb()
    assert reference.ours_over_grpc(options) == expected

    # The same through the batched math: both questions in one call, rows question-major.
    lm = load_passage_lm(str(reference.checkpoint))
    ctx = lm.encode(QUESTIONS, [one_each(passages_for(0)), one_each(passages_for(1))])
    batched = rag_math.generate(
        lm, ctx, rag_math.log_prior(SCORES), DecodingOptions(mode, decoding, num_beams, num_return, MAX_NEW_TOKENS)
    )
    assert [g.tokens for question in batched for g in question] == expected


@pytest.mark.parametrize("reference", ["early-ends"], indirect=True)  # elsewhere every hypothesis runs to the limit
def test_greedy_rag_sequence_rules_out_hypotheses_that_cannot_win(reference: Reference) -> None:
    """Guards the RAG-Sequence cases above where hypotheses end at different steps: some are stopped before their
    end (no answer starting with them could rank among those returned), and not a token changes."""
    ruled_out = lambda: REGISTRY.get_sample_value("rag_generator_hypotheses_ruled_out_total") or 0.0  # noqa: E731
    before = ruled_out()
    options = DecodingOptions(Mode.SEQUENCE, THOROUGH, 1, 1, MAX_NEW_TOKENS).to_pb()
    assert reference.ours_over_grpc(options) == reference.hf_generate(Mode.SEQUENCE, 1, 1)
    assert ruled_out() > before


def test_hypotheses_differ_between_passages(reference: Reference) -> None:
    """Guards the test above: with these weights the passages change the output, so matching is not trivial."""
    options = DecodingOptions(Mode.SEQUENCE, THOROUGH, 1, 1, MAX_NEW_TOKENS).to_pb()
    reply = reference.stub.Generate(
        generator_pb2.GenerateRequest(
            question=QUESTIONS[0], passages=[p.to_pb() for p in passages_for(0)], options=options
        ),
        timeout=60,
    )
    posterior = list(reply.hypotheses[0].passage_posteriors)
    prior = list(reply.passage_priors)
    assert max(abs(a - b) for a, b in zip(posterior, prior, strict=True)) > 0.05


@pytest.mark.parametrize("mode", [Mode.TOKEN, Mode.SEQUENCE])
def test_score_equals_transformers_nll(reference: Reference, mode: Mode) -> None:
    answers = ["Alexander Fleming", "the capital city of France is Paris"]
    hf_model = reference.rag_token if mode is Mode.TOKEN else reference.rag_sequence
    for b, question in enumerate(QUESTIONS):
        reply = reference.stub.Score(
            generator_pb2.ScoreRequest(
                question=question,
                passages=[p.to_pb() for p in passages_for(b)],
                answers=answers,
                options=DecodingOptions(mode=mode).to_pb(),
            ),
            timeout=60,
        )
        encoded = [reference.tokenizer(a)["input_ids"] for a in answers]
        nll = reference.hf_nll(hf_model, b, encoded)
        ours = torch.tensor([s.log_prob for s in reply.scores], dtype=torch.float64)
        assert torch.allclose(-nll.double(), ours, atol=1e-5, rtol=0), (nll, ours)
        assert [s.num_tokens for s in reply.scores] == [len(ids) for ids in encoded]


def test_rag_sequence_leaves_bos_unscored_only_when_every_candidate_of_the_question_has_it(
    reference: Reference,
) -> None:
    """transformers ranks a question's RAG-Sequence hypotheses with exclude_bos_score, which drops the first
    token only when *every* hypothesis starts with BOS; with some that do and some that do not, all are scored."""
    hf = reference.rag_sequence
    bos = hf.config.generator.bos_token_id
    lm = load_passage_lm(str(reference.checkpoint))
    words = [reference.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Fleming", "Paris city")]
    eos = hf.config.generator.eos_token_id
    for candidates in ([[bos, *words[0], eos], [*words[1], eos]], [[bos, *words[0], eos], [bos, *words[1], eos]]):
        b = 0
        ctx = lm.encode([QUESTIONS[b]], [one_each(passages_for(b))])
        prior = rag_math.log_prior(SCORES[b : b + 1])
        questions = [0] * len(candidates)
        scored = rag_math.score_answers(lm, ctx, prior, questions, candidates)
        ours = rag_math.without_forced_bos(scored, questions, candidates, lm.bos_token_id)
        nll = reference.hf_nll(hf, b, candidates, exclude_bos_score=True)
        torch.testing.assert_close(ours.rag_sequence(), -nll, atol=1e-5, rtol=0)
