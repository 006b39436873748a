"""Hybrid retrieval on SQuAD-open: choose the fusion on the train split, then report dev, and end to end.

    python bench/hybrid_sweep.py [--data ../shared/data] [--seed 0] [--out docs/hybrid]
                                 [--e2e-sample 100] [--skip-e2e]

1. Index the Wikipedia leads plus every SQuAD dev paragraph (all-MiniLM-L6-v2 and BM25; the SQuAD-open index of
   bench/squad_open.py, rebuilt with its lexical index where it has none).
2. Split the public questions **by article** (bench/finetune_squad.py's split, same seed). Only the train split
   chooses: each train question's dense and lexical top 100 are scored both ways once, then every fusion
   (dense, lexical, linear with each weight, RRF) is replayed on them with rag.fusion, the code the retrievers
   run. The weight with the best recall@1 on train (recall@5 breaking ties) is the default.
3. Dev, with the chosen fusion, through the gateway: `rag eval --mode retrieve --retrieval X --ks 1,5,20` for the
   three modes, and RAG-Token, RAG-Sequence and concatenated passages (k = 5, the demo's generator) with dense
   and with hybrid retrieval on a seeded sample.
Results: <out>/sweep.json and <out>/<run>/ (rag eval's files); the tables are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.finetune_squad import split_by_article  # noqa: E402
from bench.squad_open import evaluate, read_jsonl_gz, write_jsonl  # noqa: E402
from rag import paths  # noqa: E402
from rag.files import write_atomically  # noqa: E402
from rag.fusion import Fusion, FusionMethod  # noqa: E402
from rag.types import Mode, Passage, RetrievalMode  # noqa: E402
from rag_cli import assets  # noqa: E402
from rag_cli.eval import gold_rank  # noqa: E402
from rag_cli.up import Stack, UpConfig  # noqa: E402
from retriever_svc.build import index_built_from  # noqa: E402
from retriever_svc.encoders import load_encoder  # noqa: E402
from retriever_svc.layout import resolve  # noqa: E402
from retriever_svc.search import IndexShard  # noqa: E402

POOL = 100  # each list's top 100 per question: every fusion below reads at most its top 20
WEIGHTS = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
CUTOFFS = (1, 5, 20)
CANDIDATES = Fusion.candidates


def pools(index: IndexShard, questions: list[dict[str, Any]], temperature: float) -> list[list[Passage]]:
    """Each question's dense and lexical top POOL, every passage scored both ways (dense scores exact)."""
    encoder = load_encoder(index.manifest.encoder.spec)
    texts = [q["question"] for q in questions]
    queries = np.concatenate([encoder.encode_questions(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    wide = Fusion(candidates=POOL, dense_temperature=temperature)
    found = []
    for start in range(0, len(texts), 256):
        chunk = slice(start, start + 256)
        found += index.find(texts[chunk], queries[chunk], POOL, RetrievalMode.HYBRID, wide, keep_all=True)
    return found


def recall(questions: list[dict[str, Any]], ranked: list[list[str]]) -> dict[str, float]:
    ranks = [gold_rank(ids, q["gold_passage"]) for q, ids in zip(questions, ranked, strict=True)]
    result = {f"recall@{c}": sum(1 for r in ranks if r is not None and r <= c) / len(ranks) for c in CUTOFFS}
    result["mrr@20"] = sum(1 / r for r in ranks if r is not None and r <= 20) / len(ranks)
    return result


def replay(name: str, fusion: Fusion | None, mode: RetrievalMode, pool: list[list[Passage]]) -> list[list[str]]:
    """The top 20 each retrieval mode would return, from the pools."""
    k = max(CUTOFFS)
    if mode is RetrievalMode.DENSE:
        return [[p.id for p in sorted(ps, key=lambda p: (-(p.dense_score or 0), p.id))[:k]] for ps in pool]
    if mode is RetrievalMode.LEXICAL:
        matched = [[p for p in ps if (p.lexical_score or 0) > 0] for ps in pool]
        return [[p.id for p in sorted(ps, key=lambda p: (-(p.lexical_score or 0), p.id))[:k]] for ps in matched]
    assert fusion is not None
    return [[p.id for p in fusion.fuse(ps, k)] for ps in pool]


def sweep(train_pool: list[list[Passage]], train: list[dict[str, Any]], temperature: float) -> list[dict[str, Any]]:
    rows = []
    configs: list[tuple[str, RetrievalMode, Fusion | None]] = [
        ("dense", RetrievalMode.DENSE, None),
        ("lexical (BM25)", RetrievalMode.LEXICAL, None),
        ("hybrid rrf (k=60)", RetrievalMode.HYBRID, Fusion(FusionMethod.RRF, dense_temperature=temperature)),
    ]
    configs += [
        (f"hybrid linear, weight {w}", RetrievalMode.HYBRID, Fusion(weight=w, dense_temperature=temperature))
        for w in WEIGHTS
    ]
    for name, mode, fusion in configs:
        rows.append({"retrieval": name, "weight": fusion.weight if fusion else None, **recall(train, replay(
            name, fusion, mode, train_pool))})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by article")
    parser.add_argument("--out", default=str(ROOT / "docs" / "hybrid"))
    parser.add_argument("--e2e-sample", type=int, default=100, help="dev questions per end-to-end run")
    parser.add_argument("--skip-e2e", action="store_true")
    options = parser.parse_args()
    data, out = Path(options.data), Path(options.out)
    work = paths.rag_home() / "bench" / "squad-open"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    wiki = read_jsonl_gz(data / "wiki_vital_en.jsonl.gz")
    squad = read_jsonl_gz(data / "squad_v1.1_dev_paragraphs.jsonl.gz")
    questions = read_jsonl_gz(data / "squad_v1.1_dev_questions_public.jsonl.gz")
    article_of = {p["id"]: p["title"] for p in squad}
    train, dev, train_articles = split_by_article(questions, article_of, options.seed)
    dev_path = write_jsonl(work / f"questions-dev-seed{options.seed}.jsonl", dev)
    print(f"split: {len(train)} train questions ({len(train_articles)} articles), {len(dev)} dev", flush=True)

    started = time.perf_counter()
    corpus = write_jsonl(work / "wiki+squad.jsonl", wiki + squad)
    encoder_spec = f"sentence-transformer:{assets.minilm_encoder()}"
    ref = index_built_from(corpus, encoder_spec, paths.index_root(), "squad-open")
    index = IndexShard(resolve(paths.index_root(), ref), 0)
    print(f"{ref} ready in {time.perf_counter() - started:.0f} s; lexical: {index.manifest.lexical}", flush=True)
    temperature = index.manifest.encoder.score_temperature

    started = time.perf_counter()
    rows = sweep(pools(index, train, temperature), train, temperature)
    linear = [r for r in rows if r["weight"] is not None and r["retrieval"].startswith("hybrid linear")]
    best = max(linear, key=lambda r: (r["recall@1"], r["recall@5"]))
    print(f"sweep in {time.perf_counter() - started:.0f} s; chosen: {best['retrieval']}", flush=True)
    chosen = Fusion(weight=best["weight"], dense_temperature=temperature)
    dev_pool = pools(index, dev, temperature)
    dev_rows = [
        {"retrieval": name, **recall(dev, replay(name, fusion, mode, dev_pool))}
        for name, mode, fusion in (
            ("dense", RetrievalMode.DENSE, None),
            ("lexical (BM25)", RetrievalMode.LEXICAL, None),
            ("hybrid rrf (k=60)", RetrievalMode.HYBRID, replace(chosen, method=FusionMethod.RRF)),
            (f"hybrid linear, weight {chosen.weight}", RetrievalMode.HYBRID, chosen),
        )
    ]
    index.close()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "index": str(ref),
        "split": {"seed": options.seed, "train": len(train), "dev": len(dev), "train_articles": train_articles},
        "train_sweep": rows,
        "chosen": {"method": "linear", "weight": chosen.weight, "candidates": chosen.candidates},
        "dev_replayed": dev_rows,
    }
    write_atomically(out / "sweep.json", json.dumps(report, indent=2))
    if options.skip_e2e:
        return

    generator = assets.qwen_generator()
    stack = Stack(UpConfig.on_free_ports(index=str(ref), generator=str(generator), retrieval="hybrid"))
    try:
        gateway = stack.start()
        report["dev_through_gateway"] = {
            mode: evaluate(dev_path, out / f"retrieve-{mode}", gateway, "retrieve", (1, 5, 20), 0, 0, mode)
            for mode in ("dense", "lexical", "hybrid")
        }
        report["end_to_end"] = {
            f"{mode}-{retrieval}": evaluate(
                dev_path, out / f"{mode}-{retrieval}", gateway, mode, (5,), options.e2e_sample, 0, retrieval
            )
            for mode in (Mode.TOKEN.value, Mode.SEQUENCE.value, Mode.CONCAT.value)
            for retrieval in ("dense", "hybrid")
        }
    finally:
        stack.stop()
    write_atomically(out / "sweep.json", json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
