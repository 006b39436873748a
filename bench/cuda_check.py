"""The generator on a GPU: the same answers as on the CPU, served over gRPC, and its latency in float32 and bfloat16.

    python bench/cuda_check.py --qwen DIR [--out FILE]

Run where torch sees CUDA. DIR holds the demo generator's config.json, generation_config.json and tokenizer
files (no weights needed: the latency rows use a model of the same shape with random weights, whose answers run
to the token limit). Checks, each printed as one JSON line:
1. tiny random models (both families, RAG-Token and RAG-Sequence, greedy and beam 3): the tokens decoded on CUDA
   equal those decoded on the CPU, and the log-probabilities agree;
2. a generator service started with `device="cuda"` answers a Generate call;
3. Qwen2.5-0.5B-shaped RAG-Token and RAG-Sequence at k = 5 (SQuAD passages, 32 new tokens), float32 and
   bfloat16: the median time of a request, against transformers' `generate` of the five passages in one prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from generator_svc import rag_math
from generator_svc.config import Device, GeneratorConfig
from generator_svc.families import DecoderOnlyLM
from generator_svc.loading import load_passage_lm
from generator_svc.passage_lm import Context, PassageLM, one_each
from generator_svc.precision import Dtype
from generator_svc.server import create_server
from rag.serving import ServerThread
from rag.types import DecodingOptions, Mode, Passage, SequenceDecoding
from rag.v1 import generator_pb2, generator_pb2_grpc
from rag_cli.testing import random_models

SQUAD20 = Path(__file__).resolve().parent.parent / "rag_cli" / "data" / "squad20.jsonl"
TINY_PASSAGES = [
    Passage("a", "Alexander Fleming", "Fleming discovered penicillin in 1928 at St Mary's Hospital.", 2.0),
    Passage("b", "Paris", "Paris is the capital and most populous city of France, on the Seine.", 1.0),
    Passage("c", "Everest", "Mount Everest.", 0.5),
]


def report(**fields: Any) -> dict[str, Any]:
    print(json.dumps(fields), flush=True)
    return fields


def decode(lm: PassageLM, questions: list[str], contexts: list[list[Context]], options: DecodingOptions) -> list[Any]:
    ctx = lm.encode(questions, contexts)
    prior = rag_math.log_prior(torch.tensor([[p.score for (p,) in c] for c in contexts]))
    return rag_math.generate(lm, ctx, prior, options)


def same_answers(root: Path) -> list[dict[str, Any]]:
    random_models.save_rag_checkpoint(root / "rag", n_docs=3)
    models = {
        "decoder-only": random_models.save_causal_lm(root / "lm", hidden=64, init_std=1.0),
        "encoder-decoder": root / "rag",
    }
    questions = ["Who discovered penicillin?", "What is the capital of France?"]
    contexts = [one_each(TINY_PASSAGES), one_each(TINY_PASSAGES[::-1])]
    rows = []
    for family, path in models.items():
        cpu, cuda = load_passage_lm(str(path), device=Device.CPU), load_passage_lm(str(path), device=Device.CUDA)
        for mode in (Mode.TOKEN, Mode.SEQUENCE):
            for beams in (1, 3):
                options = DecodingOptions(mode=mode, num_beams=beams, num_return_sequences=beams, max_new_tokens=12)
                on_cpu, on_cuda = decode(cpu, questions, contexts, options), decode(cuda, questions, contexts, options)
                tokens_equal = [[g.tokens for g in q] for q in on_cpu] == [[g.tokens for g in q] for q in on_cuda]
                gap = max(
                    abs(a.log_prob - b.log_prob)
                    for qa, qb in zip(on_cpu, on_cuda, strict=True)
                    for a, b in zip(qa, qb, strict=True)
                )
                rows.append(
                    report(
                        check="same answers on CUDA",
                        family=family,
                        mode=mode.value,
                        beams=beams,
                        tokens_equal=tokens_equal,
                        max_log_prob_gap=round(gap, 6),
                    )
                )
    return rows


def served_on_cuda(root: Path) -> dict[str, Any]:
    thread = ServerThread()  # the service alone: the retriever's imports (faiss) are not needed here
    try:
        model = str(random_models.save_causal_lm(root / "served"))
        served = thread.start(
            create_server, GeneratorConfig(host="127.0.0.1", port=0, metrics_port=0, generator=model, device="cuda")
        )
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            reply = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(
                generator_pb2.GenerateRequest(
                    question="Who discovered penicillin?",
                    passages=[p.to_pb() for p in TINY_PASSAGES],
                    options=generator_pb2.DecodingOptions(max_new_tokens=6),
                ),
                timeout=120,
            )
        return report(
            check="gRPC Generate on CUDA",
            tokens=list(reply.hypotheses[0].token_ids),
            priors=[round(p, 4) for p in reply.passage_priors],
        )
    finally:
        thread.close()


Question = tuple[str, list[Passage]]


def median_time(questions: list[Question], run: Callable[[str, list[Passage]], object], repeats: int) -> float:
    """The median over questions of each one's median time (after one warm-up run: kernels chosen, memory pooled)."""

    def one(question: str, passages: list[Passage]) -> float:
        run(question, passages)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            run(question, passages)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return statistics.median(one(q, ps) for q, ps in questions)


def concatenated(lm: DecoderOnlyLM, question: str, passages: list[Passage], new_tokens: int) -> None:
    """What a user would run instead: transformers' `generate` with the passages in one prompt."""
    prompt = torch.tensor([lm.prompt_ids(question, tuple(passages))], device=lm.device)
    lm.model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )


def latency(qwen: Path, root: Path, repeats: int, new_tokens: int = 32) -> list[dict[str, Any]]:
    shaped = root / "qwen-shaped"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(qwen), dtype=torch.float32)
    model.save_pretrained(shaped)
    AutoTokenizer.from_pretrained(qwen).save_pretrained(shaped)
    records = [json.loads(line) for line in SQUAD20.read_text().splitlines()]
    passages = [Passage(r["passage"]["id"], r["passage"]["title"], r["passage"]["text"], 1.0) for r in records]
    questions = [(r["question"], passages[i : i + 5]) for i, r in enumerate(records[:5])]
    rows = []
    for dtype in ("float32", "bfloat16"):
        lm = load_passage_lm(str(shaped), Dtype.parse(dtype), Device.CUDA)
        assert isinstance(lm, DecoderOnlyLM)
        lm.rules = replace(lm.rules, min_new_tokens=new_tokens)  # random weights: every answer runs to the limit
        for label, options in (
            ("RAG-Token", DecodingOptions(mode=Mode.TOKEN, max_new_tokens=new_tokens)),
            (
                "RAG-Sequence thorough",
                DecodingOptions(
                    mode=Mode.SEQUENCE, sequence_decoding=SequenceDecoding.THOROUGH, max_new_tokens=new_tokens
                ),
            ),
        ):
            ours = median_time(questions, lambda q, ps: decode(lm, [q], [one_each(ps)], options), repeats)
            first = median_time(questions, lambda q, ps: lm.encode([q], [one_each(ps)]), repeats)
            reference = median_time(questions, lambda q, ps: concatenated(lm, q, ps, new_tokens), repeats)
            rows.append(
                report(
                    check="latency",
                    device=torch.cuda.get_device_name(),
                    dtype=dtype,
                    decoding=label,
                    k=5,
                    new_tokens=new_tokens,
                    median_s=round(ours, 4),
                    first_token_s=round(first, 4),
                    transformers_concatenated_s=round(reference, 4),
                    speedup=round(reference / ours, 2),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen", type=Path, required=True, help="config and tokenizer of the demo generator")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device here")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results: dict[str, Any] = {
            "same_answers": same_answers(root),
            "served": served_on_cuda(root),
            "latency": latency(options.qwen, root, options.repeats),
        }
    if options.out:
        options.out.write_text(json.dumps(results, indent=1))
    ok = all(r["tokens_equal"] for r in results["same_answers"])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
