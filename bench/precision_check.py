"""Is bfloat16 safe to serve? The quality rule for a lower precision, on held-out prompts: the first answer
token's distribution against float32's (KL, and how often the argmax is kept), for RAG rows (one passage each);
and, with `--answers N`, the answers themselves: N questions decoded greedily in RAG-Token and RAG-Sequence in both
precisions, EM/F1 against the gold answers (the rule: within 0.02 of float32 in both modes), and how many answers
changed. `rag bench --only latency` checks the same on its 20 fixed questions, where one answer is 0.05.

    python bench/precision_check.py [--generator DIR] [--questions N] [--answers N] [--out docs/precision-check.json]

Prompts: SQuAD v1.1 dev questions of the train split by article (seed 0; the latency set's 20 excluded), each
with its gold paragraph and the gold paragraphs of the next four questions of other articles, so that some rows
hold the answer and some do not. Needs ../shared/data (the project's own tests do not).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.finetune_squad import split_by_article  # noqa: E402
from generator_svc.loading import load_passage_lm  # noqa: E402
from generator_svc.model import RagModel  # noqa: E402
from generator_svc.passage_lm import one_each  # noqa: E402
from generator_svc.precision import Dtype  # noqa: E402
from generator_svc.requests import Request  # noqa: E402
from rag import paths  # noqa: E402
from rag.host import cpu_flags, cpu_model  # noqa: E402
from rag.types import DecodingOptions, Mode, Passage  # noqa: E402
from rag_cli.eval import exact_match, f1_score  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LATENCY_SET = ROOT / "rag_cli" / "data" / "squad20.jsonl"


def read_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompts(n: int) -> list[tuple[str, list[Passage], list[str]]]:
    paragraphs = {p["id"]: p for p in read_gz(DATA / "squad_v1.1_dev_paragraphs.jsonl.gz")}
    questions = read_gz(DATA / "squad_v1.1_dev_questions_public.jsonl.gz")
    article_of = {pid: pid.rsplit("-", 1)[0] for pid in paragraphs}
    train, _, _ = split_by_article(questions, article_of, seed=0)
    excluded = {json.loads(line)["id"] for line in LATENCY_SET.read_text().splitlines() if line.strip()}
    train = [q for q in train if q["id"] not in excluded]
    step = max(1, len(train) // n)
    chosen = train[::step][:n]
    out = []
    for i, q in enumerate(chosen):
        others = [
            o for o in chosen[i + 1 :] + chosen[:i] if article_of[o["gold_passage"]] != article_of[q["gold_passage"]]
        ]
        ids = [q["gold_passage"]] + [o["gold_passage"] for o in others[:4]]
        passages = [
            Passage(pid, paragraphs[pid]["title"], paragraphs[pid]["text"], 0.6 - 0.02 * k) for k, pid in enumerate(ids)
        ]
        out.append((q["question"], passages, q["answers"]))
    return out


def first_token_logprobs(generator: str, dtype: str, batch: list[tuple[str, list[Passage], list[str]]]) -> torch.Tensor:
    lm = load_passage_lm(generator, Dtype.parse(dtype))
    rows = []
    for question, passages, _ in batch:
        rows.append(lm.encode([question], [one_each(passages)]).first_logprobs)
    return torch.cat(rows)


def answers(generator: str, dtype: str, batch: list[tuple[str, list[Passage], list[str]]]) -> dict[str, list[str]]:
    """Greedy answers in RAG-Token and RAG-Sequence, as the generator serves them (passage KV cache, drafting)."""
    model = RagModel(load_passage_lm(generator, Dtype.parse(dtype), kv_cache_bytes=2**30), draft_tokens=8)
    out: dict[str, list[str]] = {}
    for mode in (Mode.TOKEN, Mode.SEQUENCE):
        options = DecodingOptions(mode=mode).with_defaults(32, 0.05)
        found = []
        for start in range(0, len(batch), 4):
            requests = [Request(q, passages, options) for q, passages, _ in batch[start : start + 4]]
            found += [answered.hypotheses[0].text for answered in model.generate(requests)]
        out[mode.label] = found
    return out


def answer_quality(generator: str, batch: list[tuple[str, list[Passage], list[str]]]) -> dict[str, Any]:
    given = {dtype: answers(generator, dtype, batch) for dtype in ("float32", "bfloat16")}
    golds = [gold for _, _, gold in batch]
    result: dict[str, Any] = {"questions": len(batch)}
    for mode in given["float32"]:
        scores = {}
        for dtype, found in given.items():
            em = sum(exact_match(a, g) for a, g in zip(found[mode], golds, strict=True)) / len(batch)
            f1 = sum(f1_score(a, g) for a, g in zip(found[mode], golds, strict=True)) / len(batch)
            scores[dtype] = {"exact_match": round(em, 4), "f1": round(f1, 4)}
        changed = sum(a != b for a, b in zip(given["float32"][mode], given["bfloat16"][mode], strict=True))
        delta = max(abs(scores["bfloat16"][m] - scores["float32"][m]) for m in ("exact_match", "f1"))
        # Rounded: two answers of 100 is 0.02 exactly, within the rule, not 0.020000000000000018.
        result[mode] = {**scores, "answers_changed": changed, "keeps_rule": round(delta, 6) <= 0.02}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=str(paths.models_dir() / paths.DEMO_GENERATOR_DIR))
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--answers", type=int, default=0, help="questions answered in both precisions (0: none)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    batch = prompts(args.questions)
    started = time.perf_counter()
    exact = first_token_logprobs(args.generator, "float32", batch)
    lowered = first_token_logprobs(args.generator, "bfloat16", batch)
    kl = (exact.exp() * (exact - lowered)).sum(-1)  # KL(float32 || bfloat16) per row, nats
    kept = (exact.argmax(-1) == lowered.argmax(-1)).float()
    gold = torch.arange(len(exact)) % 5 == 0  # the rows that read the question's own paragraph
    result = {
        "generator": Path(args.generator).name,
        "cpu": cpu_model(),
        "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
        "prompts": len(exact),
        "kl_mean": round(float(kl.mean()), 4),
        "kl_p90": round(float(kl.quantile(0.9)), 4),
        "kl_max": round(float(kl.max()), 4),
        "argmax_kept": round(float(kept.mean()), 4),
        "argmax_kept_gold_rows": round(float(kept[gold].mean()), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.answers:
        result["answers"] = answer_quality(args.generator, prompts(args.answers))
        result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
