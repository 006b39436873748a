"""Fine-tuning on SQuAD-open (the paper's section 2.4 recipe), frozen against fine-tuned, on held-out articles.

    python bench/finetune_squad.py [--data ../shared/data] [--generator smollm2-135m|qwen2.5-coder-0.5b]
                                   [--stages a,b] [--train-questions 200] [--steps 25] [--batch-size 8]
                                   [--lr 1e-4] [--lora-rank 8] [--k 5] [--generate-sample 40]
                                   [--device auto] [--out docs/finetune]

1. Split the public SQuAD dev questions **by article** (seeded): two thirds of the articles train, the rest is
   dev. Nothing is tuned on dev.
2. Index the Wikipedia leads plus every SQuAD dev paragraph with all-MiniLM-L6-v2 (the SQuAD-open index of
   bench/squad_open.py; reused when built).
3. Train with `rag train` (the exact commands are printed and written to the report):
   (a) the query encoder only (generator frozen: its p(y|x,z) needs no gradient);
   (b) both, the generator as LoRA adapters.
4. Evaluate on dev with `rag eval` through `rag up`: recall@1/5 on every dev question, and EM/F1 for closed
   book, concatenated passages, RAG-Token and RAG-Sequence at k on a seeded sample, for the frozen models and
   each stage's.
The same command runs on CUDA (`--device auto`) for the larger runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag import paths  # noqa: E402
from rag.files import open_text, write_atomically  # noqa: E402
from rag.index_ref import IndexRef  # noqa: E402
from rag.types import Mode  # noqa: E402
from rag_cli import assets  # noqa: E402
from rag_cli.demo import demo_generator  # noqa: E402
from rag_cli.eval import EvalConfig, markdown_table, run_eval  # noqa: E402
from rag_cli.up import Stack, UpConfig  # noqa: E402
from retriever_svc.build import index_built_from  # noqa: E402

GENERATION_MODES = (Mode.CLOSED_BOOK, Mode.CONCAT, Mode.TOKEN, Mode.SEQUENCE)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open_text(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def split_by_article(
    questions: list[dict[str, Any]], article_of: dict[str, str], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    articles = sorted({article_of[q["gold_passage"]] for q in questions})
    random.Random(seed).shuffle(articles)
    train_articles = set(articles[: 2 * len(articles) // 3])
    train = [q for q in questions if article_of[q["gold_passage"]] in train_articles]
    dev = [q for q in questions if article_of[q["gold_passage"]] not in train_articles]
    return train, dev, sorted(train_articles)


def public_split(
    data: Path, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The SQuAD dev paragraphs, and the public questions split by article: train, dev, the train articles."""
    squad = read_jsonl(data / "squad_v1.1_dev_paragraphs.jsonl.gz")
    questions = read_jsonl(data / "squad_v1.1_dev_questions_public.jsonl.gz")
    return squad, *split_by_article(questions, {p["id"]: p["title"] for p in squad}, seed)


def squad_open_index(data: Path, squad: list[dict[str, Any]], encoder_spec: str) -> IndexRef:
    """The SQuAD-open index (the Wikipedia leads and every SQuAD dev paragraph): one corpus, one index, built once
    for every generator and benchmark (the leads' vectors taken from the demo's index when there is one)."""
    corpus = paths.rag_home() / "bench" / "finetune" / "wiki+squad.jsonl"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(corpus, read_jsonl(data / "wiki_vital_en.jsonl.gz") + squad)
    reuse = IndexRef(paths.DEMO_INDEX) if (paths.index_root() / paths.DEMO_INDEX).is_dir() else None
    return index_built_from(corpus, encoder_spec, paths.index_root(), "squad-open", reuse_from=reuse)


def evaluate(
    index: IndexRef,
    encoder: str,
    generator: str,
    dev: Path,
    dev_sample: Path,
    k: int,
    out: Path,
    modes: tuple[Mode, ...],
    against: Path | None = None,
    retrieval: str = "",
    kv_cache_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """rag eval through rag up: retrieval on every dev question, generation on the sample; with `against` (an
    earlier evaluate's `out`), each run compared question by question with that one's; `retrieval` the mode every
    run retrieves in, generation included (dense, lexical, hybrid; empty: the gateway's default); `kv_cache_dir`
    the generator's disk tier, so a later evaluation reads the passages an earlier one ran."""

    def paired(run: str) -> str:
        return str(against / run) if against is not None and (against / run).is_dir() else ""

    cache = {"kv_cache_dir": str(kv_cache_dir)} if kv_cache_dir else {}
    stack = Stack(UpConfig.on_free_ports(index=str(index), encoder=encoder, generator=generator, **cache))
    results: dict[str, dict[str, Any]] = {}
    try:
        gateway = stack.start()
        results["retrieve"] = run_eval(
            dev,
            EvalConfig(
                gateway=gateway,
                mode="retrieve",
                k=max(k, 5),
                out=str(out / "retrieve"),
                progress=False,
                against=paired("retrieve"),
                retrieval=retrieval,
            ),
        )[0]
        for mode in modes:
            ks = 1 if mode is Mode.CLOSED_BOOK else k
            config = EvalConfig(
                gateway=gateway,
                mode=mode.value,
                k=ks,
                out=str(out / mode.value),
                progress=False,
                against=paired(mode.value),
                retrieval=retrieval,
            )
            results[mode.value] = run_eval(dev_sample, config)[0]
            print(markdown_table([results[mode.value]]).splitlines()[-1], flush=True)
    finally:
        stack.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--generator", default="smollm2-135m", help="a demo model: smollm2-135m or qwen2.5-coder-0.5b")
    parser.add_argument("--stages", default="a,b", help="a: query encoder only; b: query encoder and generator")
    parser.add_argument("--train-questions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--generate-sample", type=int, default=40, help="dev questions asked per generation mode")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "finetune"))
    options = parser.parse_args()
    data, out = Path(options.data), Path(options.out)
    work = paths.rag_home() / "bench" / "finetune" / options.generator  # each generator's runs apart
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    encoder_spec = f"sentence-transformer:{assets.minilm_encoder()}"
    generator = str(demo_generator(options.generator))
    squad, train, dev, train_articles = public_split(data, options.seed)
    rng = random.Random(options.seed)
    train_file = write_jsonl(work / "train.jsonl", rng.sample(train, min(options.train_questions, len(train))))
    dev_file = write_jsonl(work / "dev.jsonl", dev)
    dev_sample = write_jsonl(work / "dev-sample.jsonl", rng.sample(dev, min(options.generate_sample, len(dev))))
    index = squad_open_index(data, squad, encoder_spec)
    print(f"split: {len(train)} train questions ({len(train_articles)} articles), {len(dev)} dev; index {index}")

    previous = out / "report.json"  # stages run before (rag eval's results are cached too: reruns are cheap)
    report: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {"frozen": {}, "stages": {}}
    started = time.perf_counter()
    report["frozen"] = evaluate(index, "", generator, dev_file, dev_sample, options.k, out / "frozen", GENERATION_MODES)
    report["frozen"]["seconds"] = time.perf_counter() - started
    stages = [s.strip() for s in options.stages.split(",") if s.strip()]
    for stage in stages:
        what = "query-encoder" if stage == "a" else "both"
        command = [
            sys.executable, "-m", "rag_cli", "train", str(train_file), "--index", str(index), "--generator", generator,
            "--train", what, "--mode", "token", "--k", str(options.k), "--max-steps", str(options.steps),
            "--batch-size", str(options.batch_size), "--lr", str(options.lr), "--device", options.device,
            "--seed", str(options.seed), "--out", str(work / f"stage-{stage}"), "--no-progress",
        ]  # fmt: skip
        if stage == "b":
            command += ["--lora-rank", str(options.lora_rank)]
        print("$ " + " ".join(command[2:]).replace(sys.executable, "python"), flush=True)
        started = time.perf_counter()
        trained = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if trained.returncode != 0:
            raise SystemExit(f"stage {stage} failed:\n{trained.stderr[-3000:]}")
        result = json.loads(trained.stdout.strip().splitlines()[-1])
        train_seconds = time.perf_counter() - started
        encoder = f"sentence-transformer:{result['query_encoder']}" if result["query_encoder"] else ""
        tuned_generator = result["generator"] or generator
        modes = (Mode.CONCAT, Mode.TOKEN, Mode.SEQUENCE)
        evaluated = evaluate(
            index, encoder, tuned_generator, dev_file, dev_sample, options.k, out / f"stage-{stage}", modes
        )
        report["stages"][stage] = {"train": result, "train_seconds": train_seconds, "command": command[2:], **evaluated}
    report["setup"] = {
        "generator": options.generator, "train_questions": options.train_questions, "steps": options.steps,
        "batch_size": options.batch_size, "lr": options.lr, "k": options.k, "dev_questions": len(dev),
        "generate_sample": options.generate_sample, "train_articles": train_articles, "index": str(index),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": options.device,
    }  # fmt: skip
    write_atomically(out / "report.json", json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "frozen"}, indent=2)[:2000])


if __name__ == "__main__":
    main()
