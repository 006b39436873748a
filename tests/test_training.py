"""Fine-tuning (paper section 2.4): the loss is the negative marginal log-likelihood computed by the same RAG math
the generator serves with, and on one batch it equals transformers' RagTokenForGeneration /
RagSequenceForGeneration loss, with the same gradients for the question encoder and the generator."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import RagSequenceForGeneration, RagTokenForGeneration

from generator_svc import rag_math
from generator_svc.families import EncoderDecoderLM
from generator_svc.loading import load_passage_lm
from generator_svc.passage_lm import one_each
from rag.errors import FailedPrecondition
from rag.types import AskRequest, DecodingOptions, Mode, Passage
from rag.v1 import gateway_pb2_grpc, retriever_pb2, retriever_pb2_grpc
from rag_cli.eval import Example
from rag_cli.likelihoods import GeneratorScorer, LikelihoodTable
from rag_cli.testing import random_models
from rag_cli.testing.stack import Launcher, address
from retriever_svc.encoders import DPREncoder, load_encoder
from tests.conftest import TinyModels, build, corpus_records, index_build_args, rag, write_jsonl

K = 3
QUESTIONS = ["who discovered penicillin?", "what is the capital of france and its largest city?"]
ANSWERS = ["alexander fleming", "paris"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rag") / "checkpoint"
    random_models.save_rag_checkpoint(path, n_docs=K)
    return path


def passages_for(b: int) -> list[Passage]:
    return [
        Passage(f"q{b}p{k}", f"Title {k}", f"passage {k} about question {b}, " * (1 + k) + "with some more words")
        for k in range(K)
    ]


@pytest.mark.parametrize("mode", [Mode.TOKEN, Mode.SEQUENCE])
def test_loss_and_gradients_equal_transformers(checkpoint: Path, mode: Mode) -> None:
    passages = [passages_for(b) for b in range(len(QUESTIONS))]
    lm = load_passage_lm(str(checkpoint), packed=False)  # gradients flow through every weight
    encoder = load_encoder(f"dpr:{checkpoint}")
    assert isinstance(lm, EncoderDecoderLM) and isinstance(encoder, DPREncoder)
    doc_vectors = torch.randn(len(QUESTIONS), K, encoder.info.dim, generator=torch.Generator().manual_seed(0))

    # Ours: p(z|x) from the question tower against fixed passage vectors, p(y|x,z) teacher-forced, the marginal.
    q = encoder.question_vectors(QUESTIONS)
    doc_scores = torch.einsum("bd,bkd->bk", q, doc_vectors)
    targets, mask = rag_math.answer_targets([lm.answer_token_ids(a) for a in ANSWERS], lm.rules.pad_token_id)
    logprobs = lm.teacher_forced(QUESTIONS, [one_each(p) for p in passages], targets)
    ours = rag_math.marginal_nll(logprobs, mask, rag_math.log_prior(doc_scores, encoder.info.score_temperature), mode)
    ours.sum().backward()

    # transformers: the same checkpoint, the same rows, the same question-encoder scores, labels = start + answer.
    hf_class = RagTokenForGeneration if mode is Mode.TOKEN else RagSequenceForGeneration
    hf = hf_class.from_pretrained(checkpoint).eval()
    question_batch = encoder.question_tokenizer(QUESTIONS, padding=True, truncation=True, return_tensors="pt")
    hf_q = hf.rag.question_encoder(**question_batch)[0]
    hf_scores = torch.bmm(hf_q.unsqueeze(1), doc_vectors.transpose(1, 2)).squeeze(1)
    rows = lm.tokenize(QUESTIONS, [one_each(p) for p in passages])
    start = torch.full((len(QUESTIONS), 1), lm.decoder_start, dtype=torch.long)
    out = hf(
        context_input_ids=rows["input_ids"],
        context_attention_mask=rows["attention_mask"],
        doc_scores=hf_scores,
        labels=torch.cat([start, targets], dim=1),
        n_docs=K,
    )
    out.loss.sum().backward()

    torch.testing.assert_close(ours, out.loss, atol=1e-5, rtol=0)
    for ours_model, their_model in ((lm.model, hf.rag.generator), (encoder.question_model, hf.rag.question_encoder)):
        theirs = dict(their_model.named_parameters())
        compared = 0
        for name, parameter in ours_model.named_parameters():
            their_grad = theirs[name].grad
            if parameter.grad is None:
                assert their_grad is None or not their_grad.any(), name
                continue
            assert their_grad is not None, name
            torch.testing.assert_close(parameter.grad, their_grad, atol=1e-4, rtol=0, msg=name)
            compared += 1
        assert compared > 10  # the gradients really reached both models


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_the_likelihood_table_holds_what_training_teacher_forces_so_loss_and_gradients_are_equal(
    tmp_path: Path, tiny: TinyModels, checkpoint: Path, family: str
) -> None:
    """A frozen generator's table is scored through the serving path (prompt buckets, the passage KV cache); the
    training path teacher-forces whole rows. Against either, the loss and the query side's gradient are the same."""
    spec = str(tiny.causal_lm if family == "decoder-only" else checkpoint)
    lm = load_passage_lm(spec, kv_cache_bytes=2**26)
    examples = [Example(f"q{b}", q, (a,)) for b, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))]
    passages = [passages_for(b) for b in range(len(QUESTIONS))]
    table = LikelihoodTable(tmp_path / "table.sqlite", GeneratorScorer(lm, spec), "tiny@v1")
    from_table, mask = table.logprobs(examples, passages)
    assert table.scored == len(table) == len(QUESTIONS) * K

    targets, answer_mask = rag_math.answer_targets([lm.answer_token_ids(a) for a in ANSWERS], lm.rules.pad_token_id)
    with torch.no_grad():
        forced = lm.teacher_forced(QUESTIONS, [one_each(p) for p in passages], targets)
    assert torch.equal(mask, answer_mask)
    torch.testing.assert_close(from_table, torch.where(mask[:, None, :], forced, 0.0), atol=1e-4, rtol=0)
    for mode in (Mode.SEQUENCE, Mode.TOKEN):
        grads = []
        for logprobs in (from_table, forced):
            doc_scores = torch.randn(len(QUESTIONS), K, generator=torch.Generator().manual_seed(1)).requires_grad_()
            loss = rag_math.marginal_nll(logprobs, mask, rag_math.log_prior(doc_scores), mode).sum()
            loss.backward()
            grads.append((loss.detach(), doc_scores.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=0)

    # Reopened with the generator moved elsewhere, it holds the same scores and scores nothing again; once the
    # generator's weights change, a run refuses it.
    table.close()
    moved = tmp_path / "moved-generator"
    shutil.copytree(spec, moved)
    again = LikelihoodTable(tmp_path / "table.sqlite", GeneratorScorer(lm, str(moved)), "tiny@v1")
    assert torch.equal(again.logprobs(examples, passages)[0], from_table) and again.scored == 0
    again.close()
    weights = safetensors.torch.load_file(moved / "model.safetensors")
    name = next(iter(weights))
    safetensors.torch.save_file({**weights, name: weights[name] + 1}, moved / "model.safetensors")
    with pytest.raises(FailedPrecondition, match="another generator"):
        LikelihoodTable(tmp_path / "table.sqlite", GeneratorScorer(lm, str(moved)), "tiny@v1")


# ------------------------------------------------------------------------------------------------ rag train

TRAIN_QUESTIONS = [
    {"question": "Who discovered penicillin?", "answers": ["Alexander Fleming"], "gold_passage": "fleming"},
    {"question": "What is the capital of France?", "answers": ["Paris"], "gold_passage": "paris"},
    {"question": "What is Earth's highest mountain?", "answers": ["Mount Everest"], "gold_passage": "everest"},
    {"question": "What is described in sentence 2 of topic 3?", "answers": ["Topic 3"], "gold_passage": "doc3"},
]


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("questions") / "train.jsonl", TRAIN_QUESTIONS)


@pytest.fixture(scope="module")
def dpr_index(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModels, corpus: Path) -> Path:
    """The corpus indexed by DPR towers whose question tower is the tiny RAG checkpoint's."""
    root = tmp_path_factory.mktemp("dpr-indexes")
    build(corpus, root, "facts", f"dpr:question={tiny.rag_checkpoint},context={tiny.dpr_context}")
    return root


def train(questions: Path, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    result = rag("train", str(questions), "--no-progress", "--batch-size", "2", "--lr", "1e-3", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def test_rag_train_decoder_only_learns_and_its_models_answer_through_rag_up(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path, launch: Launcher
) -> None:
    out = tmp_path / "run"
    summary, _ = train(
        questions, "--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
        "--k", "3", "--max-steps", "24", "--out", str(out), "--dev", str(questions),
    )  # fmt: skip
    assert summary["out"] == str(out) and summary["steps"] == 24
    assert summary["loss_last"] < summary["loss_first"]  # the marginal likelihood of the answers went up
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert len((out / "losses.jsonl").read_text().splitlines()) == 24
    # --dev: `rag eval` through `rag up` serving the base models, then the fine-tuned ones.
    before, after = summary["dev"]["before"], summary["dev"]["after"]
    assert before["n"] == after["n"] == len(TRAIN_QUESTIONS) and "exact_match" in after and "recall_at_3" in after
    # ... with every question's result kept, and the two runs compared question by question
    assert all(len((out / run / "results.jsonl").read_text().splitlines()) == len(TRAIN_QUESTIONS)
               for run in ("dev-before", "dev-after"))  # fmt: skip
    paired = after["paired"]
    assert paired["n"] == len(TRAIN_QUESTIONS)
    for measure in ("exact_match", "recall_at_1", "gold_rank"):
        assert paired[measure]["wins"] + paired[measure]["losses"] + paired[measure]["ties"] == paired["n"]
    # The fine-tuned question tower serves the unchanged index; the generator is a plain model directory.
    tower = json.loads((out / "query_encoder" / "question_tower.json").read_text())["document_encoder"]
    assert tower["spec"] == tiny.encoder_spec
    stack = launch.stack(
        index_root, "tiny", summary["generator"], encoder=f"sentence-transformer:{summary['query_encoder']}"
    )
    with grpc.insecure_channel(stack.gateway_address) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
            AskRequest("Who discovered penicillin?", 3, DecodingOptions(max_new_tokens=4)).to_pb(), timeout=60
        )
    assert reply.index_version == "tiny@v1" and len(reply.sources) == 3 and reply.answers


def test_rag_train_encoder_decoder_with_lora_in_rag_sequence(
    tmp_path: Path, tiny: TinyModels, dpr_index: Path, questions: Path, launch: Launcher
) -> None:
    out = tmp_path / "run"
    summary, _ = train(
        questions, "--index", "facts", "--index-root", str(dpr_index), "--generator", str(tiny.rag_checkpoint),
        "--encoder", f"dpr:{tiny.rag_checkpoint}", "--mode", "sequence", "--lora-rank", "4", "--k", "3",
        "--max-steps", "16", "--out", str(out),
    )  # fmt: skip
    assert summary["loss_last"] < summary["loss_first"]
    generator = Path(summary["generator"])
    assert json.loads((generator / "config.json").read_text())["model_type"] == "rag"  # the checkpoint's layout
    tuned, base = load_passage_lm(str(generator), packed=False), load_passage_lm(str(tiny.rag_checkpoint), packed=False)
    tuned_weights, base_weights = tuned.model.state_dict(), base.model.state_dict()
    assert set(tuned_weights) == set(base_weights)  # LoRA merged: a plain checkpoint, no adapter weights
    assert any(not torch.equal(tuned_weights[n], base_weights[n]) for n in base_weights)
    # The tuned DPR question tower serves the index its document tower built.
    served = launch.retriever(dpr_index, "facts", encoder=f"dpr:question={summary['query_encoder']}")
    assert served.loading is not None and served.loading.exception() is None


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_rag_train_fully_trains_the_other_family_mode_pairs_and_they_answer_in_that_mode(
    tmp_path: Path, tiny: TinyModels, index_root: Path, dpr_index: Path, questions: Path, launch: Launcher, family: str
) -> None:
    """With the two tests above, every family trains in every mode: decoder-only in RAG-Sequence and
    encoder-decoder in RAG-Token here, both generators fully (no LoRA)."""
    if family == "decoder-only":
        mode, index, root, generator, encoder = Mode.SEQUENCE, "tiny", index_root, str(tiny.causal_lm), ""
    else:
        mode, index, root, generator = Mode.TOKEN, "facts", dpr_index, str(tiny.rag_checkpoint)
        encoder = f"dpr:{tiny.rag_checkpoint}"
    out = tmp_path / "run"
    summary, _ = train(
        questions, "--index", index, "--index-root", str(root), "--generator", generator, "--mode", mode.value,
        "--k", "3", "--max-steps", "16", "--out", str(out), *(["--encoder", encoder] if encoder else []),
    )  # fmt: skip
    assert summary["loss_last"] < summary["loss_first"]
    tuned = summary["query_encoder"] if family == "decoder-only" else f"question={summary['query_encoder']}"
    kind = "sentence-transformer" if family == "decoder-only" else "dpr"
    stack = launch.stack(root, index, summary["generator"], encoder=f"{kind}:{tuned}")
    options = DecodingOptions(mode=mode, max_new_tokens=4)
    with grpc.insecure_channel(stack.gateway_address) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
            AskRequest("Who discovered penicillin?", 3, options).to_pb(), timeout=60
        )
    assert reply.index_version == f"{index}@v1" and len(reply.sources) == 3 and reply.answers
    assert abs(sum(s.posterior for s in reply.sources) - 1) < 1e-4  # the tuned model's p(z|x,y) is a distribution


def test_a_fine_tuned_question_tower_refuses_an_index_of_another_document_encoder(
    tmp_path: Path,
    tiny: TinyModels,
    index_root: Path,
    dpr_index: Path,
    questions: Path,
    corpus: Path,
    launch: Launcher,
) -> None:
    out = tmp_path / "run"
    summary, _ = train(
        questions, "--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
        "--train", "query-encoder", "--k", "2", "--max-steps", "3", "--out", str(out),
    )  # fmt: skip
    assert summary["generator"] is None and summary["query_encoder"]  # the generator stayed frozen
    tower = f"sentence-transformer:{summary['query_encoder']}"
    served = launch.retriever(dpr_index, "facts", encoder=tower)
    assert served.loading is not None
    message = str(served.loading.exception())
    assert "built with a different encoder" in message and "dpr:question=" in message and tower in message
    # and it builds no index: it is a question tower only
    failed = rag(*index_build_args(corpus, tmp_path / "indexes", "x", tower))
    assert failed.returncode == 1 and "fine-tuned question tower" in failed.stderr


def test_rag_train_resumes_from_its_checkpoint(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path
) -> None:
    out = tmp_path / "run"
    common = ["--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm), "--k", "2",
              "--out", str(out), "--checkpoint-every", "2"]  # fmt: skip
    first, _ = train(questions, *common, "--max-steps", "2")
    second, result = train(questions, *common, "--max-steps", "4")
    assert "resuming" in result.stderr and second["steps"] == 4 and second["loss_first"] == first["loss_first"]
    other = rag("train", str(questions), *common, "--max-steps", "4", "--mode", "token")
    assert other.returncode == 1 and "a run with other settings" in other.stderr


@pytest.mark.parametrize(
    ("setup", "message", "exit_code"),
    [  # 2: what the command was given is invalid; 1: valid, but it cannot be done (the index's encoder)
        ("empty questions", "holds no questions", 2),
        ("no answers", 'expected {"question", "answers": [...]}', 2),
        ("another document encoder", "built with a different encoder", 1),
        ("k beyond the index", "is more than the", 2),
        ("unknown mode", "--mode must be token or sequence", 2),
        ("unknown part", "--train must be one of", 2),
        ("cache of a generator that learns", "and this generator learns", 2),
    ],
)
def test_rag_train_refuses_bad_input_and_writes_nothing(
    tmp_path: Path,
    tiny: TinyModels,
    index_root: Path,
    dpr_index: Path,
    questions: Path,
    setup: str,
    message: str,
    exit_code: int,
) -> None:
    out = tmp_path / "run"
    args = ["--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm), "--out", str(out)]
    given = questions
    if setup == "empty questions":
        given = tmp_path / "empty.jsonl"
        given.write_text("")
    elif setup == "no answers":
        given = write_jsonl(tmp_path / "q.jsonl", [{"question": "Who?"}])
    elif setup == "another document encoder":
        args = ["--index", "facts", "--index-root", str(dpr_index), "--encoder", tiny.encoder_spec,
                "--generator", str(tiny.causal_lm), "--out", str(out)]  # fmt: skip
    elif setup == "k beyond the index":
        args += ["--k", "100000"]
    elif setup == "unknown mode":
        args += ["--mode", "closed-book"]
    elif setup == "cache of a generator that learns":
        args += ["--train", "both", "--kv-cache-dir", str(tmp_path / "kv")]
    else:
        args += ["--train", "everything"]
    result = rag("train", str(given), *args)
    assert result.returncode == exit_code and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_rag_train_one_step_with_hybrid_candidates_trains_the_query_encoder(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path
) -> None:
    # Hybrid: candidates from both lists, p(z|x) = softmax(q.d / T + weight * bm25); the gradient reaches the query
    # encoder through the dense term.
    common = ["--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
              "--train", "query-encoder", "--k", "3", "--max-steps", "1", "--lr", "1e-2"]  # fmt: skip
    runs = {mode: train(questions, *common, "--retrieval", mode, "--out", str(tmp_path / mode))[0]
            for mode in ("dense", "hybrid")}  # fmt: skip
    assert runs["hybrid"]["steps"] == 1 and torch.isfinite(torch.tensor(runs["hybrid"]["loss_first"]))
    assert runs["hybrid"]["loss_first"] != pytest.approx(runs["dense"]["loss_first"])  # another prior, other passages
    base = load_encoder(tiny.encoder_spec).question_model.state_dict()
    trained = load_encoder(f"sentence-transformer:{runs['hybrid']['query_encoder']}").question_model.state_dict()
    assert any(not torch.equal(base[name], trained[name]) for name in base)
    refused = rag("train", str(questions), *common, "--retrieval", "lexical", "--out", str(tmp_path / "lexical"))
    assert refused.returncode == 2 and "dense or hybrid" in refused.stderr
    assert not (tmp_path / "lexical").exists()


def test_rag_train_scores_its_likelihood_table_once_and_later_runs_reuse_and_extend_it(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path, checkpoint: Path
) -> None:
    common = ["--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
              "--train", "query-encoder", "--k", "2", "--max-steps", "2"]  # fmt: skip
    first, _ = train(questions, *common, "--candidates", "2", "--out", str(tmp_path / "a"))
    table = first["likelihoods"]
    assert table["path"] == str(tmp_path / "a" / "likelihoods.sqlite") and table["scorer"] == "generator"
    assert table["pairs"] == table["scored_by_this_run"] >= 2 * len(TRAIN_QUESTIONS)  # + what entered a top 2 later
    # More candidates, reading the first run's table: only the pairs it lacks are scored.
    more = [*common, "--candidates", "4", "--likelihoods", table["path"]]
    second, _ = train(questions, *more, "--out", str(tmp_path / "b"))
    extended = second["likelihoods"]
    assert extended["pairs"] == table["pairs"] + extended["scored_by_this_run"] >= 4 * len(TRAIN_QUESTIONS)
    assert extended["scored_by_this_run"] < extended["pairs"] - table["pairs"] + 4 * len(TRAIN_QUESTIONS)
    # The same run again scores nothing, and trains the same.
    third, _ = train(questions, *more, "--out", str(tmp_path / "c"))
    assert third["likelihoods"]["scored_by_this_run"] == 0 and third["likelihoods"]["pairs"] == extended["pairs"]
    assert third["loss_first"] == second["loss_first"] and third["loss_last"] == second["loss_last"]
    # A table of another generator is refused, not mixed.
    other = rag("train", str(questions), *common, "--likelihoods", table["path"], "--generator", str(checkpoint),
                "--out", str(tmp_path / "d"))  # fmt: skip
    assert other.returncode == 1 and "holds likelihoods scored with another generator" in other.stderr
    # So is a table that does not record the prompt's wording (scored before it was recorded, under another).
    unworded = tmp_path / "unworded.sqlite"
    shutil.copy(table["path"], unworded)
    with sqlite3.connect(unworded) as db:
        identity = json.loads(db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0])
        identity["prompt"] = json.dumps({k: v for k, v in json.loads(identity["prompt"]).items() if k != "layout"})
        db.execute("UPDATE meta SET value = ? WHERE key = 'identity'", (json.dumps(identity),))
    reworded = rag("train", str(questions), *common, "--candidates", "2", "--likelihoods", str(unworded),
                   "--out", str(tmp_path / "e"))  # fmt: skip
    assert reworded.returncode == 1 and "holds likelihoods scored with another prompt" in reworded.stderr


def test_rag_train_with_a_kv_cache_disk_tier_runs_each_passage_once_across_runs_and_scores_the_same(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path
) -> None:
    common = ["--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
              "--train", "query-encoder", "--k", "2", "--candidates", "4", "--max-steps", "2"]  # fmt: skip
    plain, _ = train(questions, *common, "--out", str(tmp_path / "plain"))
    disk = ["--kv-cache-dir", str(tmp_path / "kv")]
    first, _ = train(questions, *common, *disk, "--out", str(tmp_path / "a"))
    second, _ = train(questions, *common, *disk, "--out", str(tmp_path / "b"))  # a new table: every pair scored again
    ran = first["likelihoods"]["passage_segments_miss"]
    assert ran > 0 and len(list((tmp_path / "kv").rglob("*.safetensors"))) == ran
    assert second["likelihoods"]["passage_segments_miss"] == 0  # every passage read from disk instead
    assert second["likelihoods"]["passage_segments_disk"] == ran

    def scores(run: dict[str, Any]) -> dict[tuple[str, str, str], np.ndarray]:
        with sqlite3.connect(run["likelihoods"]["path"]) as db:
            rows = db.execute("SELECT * FROM likelihood").fetchall()
        return {(q, a, p): np.frombuffer(blob, np.float32) for q, a, p, blob in rows}

    reference = scores(plain)
    for run in (first, second):
        table = scores(run)
        assert table.keys() == reference.keys() and len(table) >= 4 * len(TRAIN_QUESTIONS)
        for key, values in reference.items():
            np.testing.assert_allclose(table[key], values, atol=1e-5, rtol=0)
    assert second["loss_last"] == pytest.approx(plain["loss_last"], abs=1e-5)


def test_rag_train_oracle_reader_scores_a_passage_by_whether_it_holds_the_answer(
    tmp_path: Path, index_root: Path, questions: Path
) -> None:
    common = ["--index", "tiny", "--index-root", str(index_root), "--train", "query-encoder", "--k", "3"]
    summary, _ = train(questions, *common, "--oracle-reader", "--max-steps", "4", "--out", str(tmp_path / "gate"))
    table = summary["likelihoods"]
    assert table["scorer"] == "oracle-reader" and "generator" not in table  # no generator was loaded
    documents = {r["id"]: r for r in corpus_records()}
    with sqlite3.connect(table["path"]) as db:
        rows = db.execute("SELECT answer, passage, logprobs FROM likelihood").fetchall()
    holding = 0
    for answer, passage, blob in rows:
        document = documents.get(passage) or documents[passage.rsplit("-", 1)[0]]  # a piece of a split document
        holds = re.search(rf"\b{re.escape(answer)}\b", f"{document['title']} {document['text']}", re.I) is not None
        assert np.frombuffer(blob, np.float32).tolist() == [0.0 if holds else -10.0], (answer, passage)
        holding += holds
    assert 0 < holding < len(rows) == table["pairs"]
    refused = rag("train", str(questions), *common, "--oracle-reader", "--train", "both", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--oracle-reader replaces the generator" in refused.stderr


def test_rag_train_keeps_the_checkpoint_the_held_out_questions_like_best_and_stops_when_they_stop_improving(
    tmp_path: Path, tiny: TinyModels, index_root: Path
) -> None:
    many = write_jsonl(tmp_path / "q.jsonl", [
        {"question": f"What is described in sentence {j} of topic {i}?", "answers": [f"Topic {i}"],
         "gold_passage": f"doc{i}"}
        for i in range(12) for j in range(2)
    ])  # fmt: skip
    common = ["--index", "tiny", "--index-root", str(index_root), "--train", "query-encoder", "--oracle-reader",
              "--k", "3", "--held-out", "0.25", "--eval-every", "1", "--patience", "2", "--lr", "3e-2"]  # fmt: skip
    summary, _ = train(many, *common, "--max-steps", "12", "--out", str(tmp_path / "run"))
    held = summary["held_out"]
    assert held["questions"] == 6  # three gold passages' questions, whole
    nll = [e["nll"] for e in held["evaluations"]]
    assert [e["step"] for e in held["evaluations"]] == list(range(len(nll)))  # before training, then every step
    assert held["best_step"] == int(np.argmin(nll)) and held["best_nll"] == min(nll)
    assert held["stopped_early"] == (summary["steps"] < 12)
    if held["stopped_early"]:  # exactly `patience` evaluations after the best
        assert summary["steps"] == held["best_step"] + 2
    # What it wrote is the best step's encoder: a run starting from it measures the best NLL before its first step.
    kept = f"sentence-transformer:{summary['query_encoder']}"
    again, _ = train(many, *common, "--encoder", kept, "--max-steps", "1", "--out", str(tmp_path / "again"))
    assert again["held_out"]["evaluations"][0]["nll"] == pytest.approx(held["best_nll"], abs=1e-5)


@pytest.mark.parametrize("what", ["query-encoder", "both"])
def test_rag_train_data_parallel_over_two_processes_trains_what_one_process_does(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path, what: str
) -> None:
    """torchrun with 2 gloo processes, each taking half of every step's questions (DDP averaging the gradients;
    the likelihood table scored half by each): the same losses and weights as one process with the same batch."""
    args = [str(questions), "--index", "tiny", "--index-root", str(index_root), "--generator", str(tiny.causal_lm),
            "--train", what, "--k", "2", "--max-steps", "3", "--batch-size", "3", "--lr", "1e-3", "--no-progress"]  # fmt: skip
    one, _ = train(Path(args[0]), *args[1:], "--out", str(tmp_path / "one"))
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rag_cli", "train", *args, "--out", str(tmp_path / "two")],  # fmt: skip
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 reports, the other rank only trained
    summary = reports[0]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "losses.jsonl").read_text().splitlines()]
              for run in ("one", "two")]  # fmt: skip
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    towers = [
        load_encoder(f"sentence-transformer:{s['query_encoder']}").question_model.state_dict() for s in (one, summary)
    ]
    for name, weight in towers[0].items():
        torch.testing.assert_close(towers[1][name], weight, atol=1e-5, rtol=0, msg=name)
    if what == "both":
        generators = [load_passage_lm(s["generator"], packed=False).model.state_dict() for s in (one, summary)]
        for name, weight in generators[0].items():
            torch.testing.assert_close(generators[1][name], weight, atol=1e-5, rtol=0, msg=name)
    else:
        assert summary["likelihoods"]["pairs"] == one["likelihoods"]["pairs"]


def test_rag_train_writes_a_query_encoder_lora_adapter_that_a_retriever_serves_over_the_unchanged_index(
    tmp_path: Path, tiny: TinyModels, index_root: Path, questions: Path, launch: Launcher
) -> None:
    out = tmp_path / "run"
    summary, _ = train(
        questions, "--index", "tiny", "--index-root", str(index_root), "--train", "query-encoder", "--oracle-reader",
        "--encoder-lora-rank", "2", "--k", "3", "--max-steps", "4", "--lr", "1e-2", "--out", str(out),
    )  # fmt: skip
    adapter = Path(summary["query_encoder"])
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    base_size = sum(f.stat().st_size for f in Path(tiny.sentence_encoder).glob("*.safetensors"))
    assert sum(f.stat().st_size for f in adapter.iterdir()) < base_size / 4  # the adapter alone
    spec = json.loads((out / "summary.json").read_text())["query_encoder_spec"]
    assert spec == f"{tiny.encoder_spec}+{adapter}"

    served = launch.retriever(index_root, "tiny", encoder=spec)
    request = retriever_pb2.SearchRequest(
        questions=QUESTIONS, k=3, retrieval=retriever_pb2.RETRIEVAL_MODE_DENSE, include_query_embeddings=True
    )
    with grpc.insecure_channel(address(served)) as channel:
        reply = retriever_pb2_grpc.RetrieverServiceStub(channel).Search(request, timeout=60)
    assert reply.index_version == "tiny@v1" and all(len(r.passages) == 3 for r in reply.results)
    served_vectors = torch.tensor([list(r.query_embedding) for r in reply.results])
    adapted, base = (load_encoder(s).encode_questions(QUESTIONS) for s in (spec, tiny.encoder_spec))
    torch.testing.assert_close(served_vectors, torch.from_numpy(adapted), atol=1e-5, rtol=0)
    assert not torch.allclose(served_vectors, torch.from_numpy(base), atol=1e-3)  # the adapter moved the questions
