"""Training that moves retrieval (issue T): the paper's query-encoder fine-tuning against a frozen generator's
likelihood table, on SQuAD-open, split by article.

    python bench/train_retrieval.py [--data ../shared/data] [--generator qwen2.5-coder-0.5b] [--stages gate,table]
                                    [--train-questions 0] [--k 10] [--candidates 20] [--epochs 10] [--max-steps 0]
                                    [--batch-size 16] [--lr 3e-5] [--generate-sample 40] [--device auto]
                                    [--generator-dtype auto] [--encoder-lora-rank 0]
                                    [--out docs/train-retrieval] [--tag=-lr1e-4]

1. The public SQuAD dev questions split **by article** (bench/finetune_squad.split_by_article, seed 0): two thirds
   of the articles train (a held-out tenth of those, whole paragraphs, picks the checkpoint), the rest is dev.
   Nothing is tuned on dev.
2. The SQuAD-open index (Wikipedia leads + every SQuAD dev paragraph, all-MiniLM-L6-v2), as bench/squad_open.py.
3. Before: the untrained encoder, `rag eval` through `rag up`, dense retrieval (the mode the encoder trains in):
   recall@1/5/10 on every dev question, EM/F1 of concatenated passages and RAG-Sequence at k on a seeded dev
   sample.
4. Stages, each `rag train --train query-encoder --mode sequence --k K` (the commands are printed and reported):
   gate:  `--oracle-reader` (log p(y|x,z) = 0 if the passage holds an answer, else -10): what a perfect reader
          would teach the encoder, the bound;
   table: the demo's generator frozen, its likelihood table scored through the serving path, then many steps;
          it starts from OUT/likelihoods-<run>.sqlite.gz where $RAG_HOME has no table yet;
   snapshot: writes that file from the table as scored so far (a run may be writing it): the scoring of hours,
          carried to another machine (a few hundred KiB per 10,000 pairs).
   After each, the same evaluation, compared question by question with the untrained run (wins, losses, sign test).
Results: OUT/untrained, OUT/<stage>-<train questions><tag>/ (rag eval's runs), OUT/report-<train questions><tag>.json.
Everything is resumable: rag eval's results and rag train's table and checkpoints are kept under $RAG_HOME/bench.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.finetune_squad import evaluate, public_split, squad_open_index, write_jsonl  # noqa: E402
from rag import paths  # noqa: E402
from rag.files import publishing, write_atomically  # noqa: E402
from rag.types import Mode  # noqa: E402
from rag_cli import assets  # noqa: E402
from rag_cli.bench import machine  # noqa: E402
from rag_cli.demo import demo_generator  # noqa: E402

MODES = (Mode.CONCAT, Mode.SEQUENCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--generator", default="qwen2.5-coder-0.5b", help="qwen2.5-coder-0.5b or smollm2-135m")
    parser.add_argument("--stages", default="gate,table")
    parser.add_argument("--train-questions", type=int, default=0, help="a seeded sample of the train split (0: all)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--max-steps", type=int, default=0, help="stop training here (a run resumed with it finishes at once); 0: off"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--encoder-lora-rank", type=int, default=0, help="train a LoRA adapter of this rank (0: all)")
    parser.add_argument(
        "--generate-sample", type=int, default=40, help="dev questions asked per generation mode (0: retrieval only)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--generator-dtype", default="auto", help="precision the frozen generator scores in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "train-retrieval"))
    parser.add_argument("--tag", default="", help="appended to the runs' names (another setting on the same sample)")
    options = parser.parse_args()
    data, out = Path(options.data), Path(options.out)
    work = paths.rag_home() / "bench" / "train-retrieval"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    encoder_spec = f"sentence-transformer:{assets.minilm_encoder()}"
    generator = str(demo_generator(options.generator))
    squad, train, dev, train_articles = public_split(data, options.seed)
    rng = random.Random(options.seed)
    if options.train_questions:
        train = rng.sample(train, min(options.train_questions, len(train)))
    train_file = write_jsonl(work / f"train-{len(train)}.jsonl", train)
    dev_file = write_jsonl(work / "dev.jsonl", dev)
    # Its own generator: the same sample whatever the train sample, so every stage is paired with the untrained run.
    sample = random.Random(options.seed + 1).sample(dev, min(options.generate_sample, len(dev)))
    dev_sample = write_jsonl(work / f"dev-sample-{len(sample)}.jsonl", sample)
    index = squad_open_index(data, squad, encoder_spec)
    print(f"split: {len(train)} train questions ({len(train_articles)} articles), {len(dev)} dev; index {index}")

    run = f"{len(train)}{options.tag}"  # names this train sample's runs (and, with --tag, their setting)
    previous = out / f"report-{run}.json"  # stages run before on this train sample are kept
    report: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {"stages": {}}
    stages = [s.strip() for s in options.stages.split(",") if s.strip()]
    table, snapshot = work / f"table-{run}" / "likelihoods.sqlite", out / f"likelihoods-{run}.sqlite.gz"
    if "snapshot" in stages:  # the table as scored so far, beside the reports: another machine resumes from it
        save_snapshot(table, snapshot)
        stages.remove("snapshot")
        if not stages:
            return
    started = time.perf_counter()
    before = out / "untrained"  # shared by runs on other train samples: the dev side is the same
    modes = MODES if options.generate_sample else ()  # 0: retrieval only (the gate needs no generation)
    # One disk tier for every generator of the bench: a passage runs once, for the table, its lazy scoring and the
    # evaluations (the trained encoder's sample retrieves mostly the passages the untrained one's ran).
    kv_cache = work / "kv-cache"
    report["untrained"] = evaluate(
        index, "", generator, dev_file, dev_sample, options.k, before, modes, None, "dense", kv_cache
    )
    report["untrained"]["seconds"] = time.perf_counter() - started
    for stage in stages:
        if stage == "table" and not table.exists() and snapshot.exists():
            restore_snapshot(snapshot, table)
        command = [
            sys.executable, "-m", "rag_cli", "train", str(train_file), "--index", str(index), "--generator", generator,
            "--train", "query-encoder", "--mode", "sequence", "--k", str(options.k),
            "--candidates", str(options.candidates), "--epochs", str(options.epochs),
            "--batch-size", str(options.batch_size), "--lr", str(options.lr), "--device", options.device,
            "--seed", str(options.seed), "--out", str(work / f"{stage}-{run}"), "--no-progress",
            "--generator-dtype", options.generator_dtype, "--encoder-lora-rank", str(options.encoder_lora_rank),
            "--max-steps", str(options.max_steps),
        ]  # fmt: skip
        if stage == "gate":
            command.append("--oracle-reader")
        else:  # every table stage's generator runs each passage once, whichever run and question retrieve it
            command += ["--kv-cache-dir", str(kv_cache)]
        print("$ " + " ".join(command[2:]).replace(sys.executable, "python"), flush=True)
        started = time.perf_counter()
        trained = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if trained.returncode != 0:
            raise SystemExit(f"stage {stage} failed:\n{trained.stderr[-3000:]}")
        result = json.loads(trained.stdout.strip().splitlines()[-1])
        train_seconds = time.perf_counter() - started
        encoder = json.loads((Path(result["out"]) / "summary.json").read_text())["query_encoder_spec"]
        evaluated = evaluate(
            index,
            encoder,
            generator,
            dev_file,
            dev_sample,
            options.k,
            out / f"{stage}-{run}",
            modes,
            against=before,
            retrieval="dense",
            kv_cache_dir=kv_cache,
        )
        report["stages"][stage] = {"train": result, "train_seconds": train_seconds, "command": command[2:], **evaluated}
        print(json.dumps({m: {k: v for k, v in r.items() if not isinstance(v, dict)} for m, r in evaluated.items()}))
    report["setup"] = {
        **{k: v for k, v in vars(options).items() if k not in ("data", "out")},
        "train_questions": len(train), "dev_questions": len(dev), "train_articles": train_articles,
        "index": str(index), "machine": machine(), "python": platform.python_version(),
    }  # fmt: skip
    write_atomically(out / f"report-{run}.json", json.dumps(report, indent=2))


def save_snapshot(table: Path, snapshot: Path) -> None:
    """A consistent copy of the SQLite table (while a run may still be writing it), compacted and gzipped."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "likelihoods.sqlite"
        with closing(sqlite3.connect(table)) as source, closing(sqlite3.connect(copy)) as target:
            source.backup(target)
            target.execute("VACUUM")
            pairs = target.execute("SELECT COUNT(*) FROM likelihood").fetchone()[0]
        with publishing(snapshot) as out, gzip.open(out, "wb", compresslevel=9) as packed:
            packed.write(copy.read_bytes())
    print(f"snapshot: {pairs} pairs of {table} in {snapshot} ({snapshot.stat().st_size >> 10} KiB)")


def restore_snapshot(snapshot: Path, table: Path) -> None:
    table.parent.mkdir(parents=True, exist_ok=True)
    with publishing(table) as out:
        out.write_bytes(gzip.decompress(snapshot.read_bytes()))
    print(f"table: resumed from {snapshot}")


if __name__ == "__main__":
    main()
