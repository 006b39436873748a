"""The passage KV cache and drafted decoding on the demo model: the same answers with them on and off, and the
time they save.

    python bench/kv_cache_check.py [--dtype auto] [--out docs/kv-cache-check.json]

The 20 questions of `rag bench --only latency` (rag_cli/data/squad20.jsonl), each with its own paragraph and the
paragraphs of the next four questions (k = 5, as the latency bench), RAG-Token greedy and RAG-Sequence (beam 1),
32 new tokens, in-process (the model's work only, no gRPC): uncached, then cached twice. Cold: an empty cache, each
paragraph run once by the first question that reads it and reused by the next four (as SQuAD's several questions
about one paragraph would); warm: every segment from the cache, as for passages that many requests retrieve;
then warm and drafted (greedy verifying up to 8 drafted tokens per pass; RAG-Sequence does not draft).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generator_svc.config import Device  # noqa: E402
from generator_svc.families import DecoderOnlyLM  # noqa: E402
from generator_svc.loading import load_passage_lm, resolve_device  # noqa: E402
from generator_svc.model import RagModel  # noqa: E402
from generator_svc.passage_cache import auto_budget_bytes  # noqa: E402
from generator_svc.precision import Dtype, choose_precision  # noqa: E402
from generator_svc.requests import Request  # noqa: E402
from rag import paths  # noqa: E402
from rag.host import cpu_flags, cpu_model  # noqa: E402
from rag.types import DecodingOptions, Mode, Passage  # noqa: E402

QUESTIONS = ROOT / "rag_cli" / "data" / "squad20.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=str(paths.models_dir() / paths.DEMO_GENERATOR_DIR))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", default="token,sequence", help="token, sequence or both")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    records = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    passages = [Passage(r["passage"]["id"], r["passage"]["title"], r["passage"]["text"], 1.0) for r in records]
    precision = choose_precision(Dtype.parse(args.dtype), resolve_device(Device.AUTO))
    plain = RagModel(load_passage_lm(args.generator, precision.dtype))
    cached = RagModel(
        load_passage_lm(args.generator, precision.dtype, kv_cache_bytes=auto_budget_bytes(plain.lm.device))
    )
    result: dict[str, object] = {
        "generator": Path(args.generator).name, "dtype": precision.dtype.value, "cpu": cpu_model(),
        "flags": sorted({"amx_bf16", "avx512_bf16", "avx2"} & cpu_flags()),
    }  # fmt: skip
    drafted = RagModel(cached.lm, draft_tokens=8)
    for model in (plain, cached):
        model.warm_up()
    assert isinstance(cached.lm, DecoderOnlyLM) and cached.lm.passage_cache is not None
    for mode in [Mode.TOKEN if m.strip() == "token" else Mode.SEQUENCE for m in args.modes.split(",")]:
        cached.lm.passage_cache.clear()  # each mode starts cold
        options = DecodingOptions(mode=mode, max_new_tokens=32).with_defaults(32, 1.0)
        requests = [
            Request(r["question"], [passages[(i + j) % len(passages)] for j in range(5)], options)
            for i, r in enumerate(records)
        ]
        rounds: dict[str, list[float]] = {}
        answers: dict[str, list[tuple[int, ...]]] = {}
        configurations = (
            ("uncached", plain),
            ("cached, cold", cached),
            ("cached, warm", cached),
            ("cached, warm, drafted", drafted),
        )
        for name, model in configurations:
            seconds, tokens = [], []
            for request in requests:
                started = time.perf_counter()
                [answered] = model.generate([request])
                seconds.append(time.perf_counter() - started)
                tokens.append(answered.hypotheses[0].token_ids)
            rounds[name], answers[name] = seconds, tokens
        same = {name: sum(a == b for a, b in zip(answers["uncached"], answers[name], strict=True)) for name in answers}
        result[mode.label] = {
            name: {"median_s": round(statistics.median(s), 3), "same_answers": same[name], "of": len(s)}
            for name, s in rounds.items()
        }
        print(json.dumps({mode.label: result[mode.label]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
