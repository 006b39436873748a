"""SQuAD-open on the demo models, as the paper's tables compare systems, plus the knowledge-update experiment.

    python bench/squad_open.py [--data ../shared/data] [--sample 25] [--seed 0] [--out docs/squad-open]

1. SQuAD-open: index the 10,033 Wikipedia lead paragraphs plus every SQuAD v1.1 dev paragraph (MiniLM), and ask
   the public dev questions without their paragraph. Retrieval recall@1/5/20 over all public questions;
   closed-book, concatenated passages, RAG-Token and RAG-Sequence (Qwen2.5-Coder-0.5B-Instruct) for k in
   {1, 5, 10} on a seeded sample.
2. Knowledge update (the paper's section 4.5, with two halves of SQuAD's articles for 2016 and 2018): two
   indexes, each the Wikipedia leads plus the paragraphs of one half of the articles; the questions of each half
   are asked against both, swapping the running retrievers between the two indexes (`rag index swap`).

Every evaluation is a `rag eval` run through the gateway, resumable: rerunning picks up where it stopped.
Results: <out>/<run>/{results.jsonl,summary.json,table.md}, and the tables in <out>/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag import paths  # noqa: E402
from rag.files import open_text, write_atomically  # noqa: E402
from rag.index_ref import IndexRef  # noqa: E402
from rag.types import Mode  # noqa: E402
from rag_cli import assets  # noqa: E402
from rag_cli.admin import AdminConfig, swap  # noqa: E402
from rag_cli.eval import EvalConfig, markdown_table, run_eval  # noqa: E402
from rag_cli.up import Stack, UpConfig  # noqa: E402
from retriever_svc.build import index_built_from  # noqa: E402

GENERATION_MODES = tuple(m.value for m in (Mode.CLOSED_BOOK, Mode.CONCAT, Mode.TOKEN, Mode.SEQUENCE))
KS = (1, 5, 10)


def read_jsonl_gz(path: Path) -> list[dict]:
    with open_text(path) as handle:
        return [json.loads(line) for line in handle]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    if not path.exists():
        write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build(corpus: Path, name: str, encoder_spec: str) -> IndexRef:
    # The demo's index, when there is one: the leads are encoded already.
    reuse = IndexRef(paths.DEMO_INDEX) if (paths.index_root() / paths.DEMO_INDEX).is_dir() else None
    return index_built_from(corpus, encoder_spec, paths.index_root(), name, reuse_from=reuse)


def evaluate(
    questions: Path,
    out: Path,
    gateway: str,
    mode: str,
    ks: tuple[int, ...],
    sample: int,
    seed: int,
    retrieval: str = "",
) -> list[dict]:
    config = EvalConfig(
        gateway=gateway,
        mode=mode,
        retrieval=retrieval,
        ks=",".join(map(str, ks)),
        limit=sample,
        seed=seed,
        out=str(out),
    )
    summaries = run_eval(questions, config)
    print(markdown_table(summaries), flush=True)
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--sample", type=int, default=25, help="questions per generation run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "squad-open"))
    options = parser.parse_args()
    data, out = Path(options.data), Path(options.out)
    work = paths.rag_home() / "bench" / "squad-open"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    encoder_spec = f"sentence-transformer:{assets.minilm_encoder()}"
    generator = assets.qwen_generator()
    wiki = read_jsonl_gz(data / "wiki_vital_en.jsonl.gz")
    squad = read_jsonl_gz(data / "squad_v1.1_dev_paragraphs.jsonl.gz")
    questions = read_jsonl_gz(data / "squad_v1.1_dev_questions_public.jsonl.gz")
    # The knowledge-update halves: alternate SQuAD's articles in their order.
    articles = list(dict.fromkeys(p["title"] for p in squad))
    half_of = {title: i % 2 for i, title in enumerate(articles)}
    article_of_paragraph = {p["id"]: p["title"] for p in squad}

    corpus_all = write_jsonl(work / "wiki+squad.jsonl", wiki + squad)
    corpus_half = [
        write_jsonl(work / f"wiki+squad-half{h}.jsonl", wiki + [p for p in squad if half_of[p["title"]] == h])
        for h in (0, 1)
    ]
    questions_all = data / "squad_v1.1_dev_questions_public.jsonl.gz"
    questions_half = [
        write_jsonl(
            work / f"questions-half{h}.jsonl",
            [q for q in questions if half_of[article_of_paragraph[q["gold_passage"]]] == h],
        )
        for h in (0, 1)
    ]
    started = time.perf_counter()
    index_all = build(corpus_all, "squad-open", encoder_spec)
    index_half = [build(corpus_half[h], f"squad-half{h}", encoder_spec) for h in (0, 1)]
    print(f"indexes ready in {time.perf_counter() - started:.0f} s: {index_all}, {index_half}", flush=True)

    os.environ.setdefault("RAG_ADMIN_TOKEN", secrets.token_urlsafe(24))
    admin_token = os.environ["RAG_ADMIN_TOKEN"]
    results: dict[str, list[dict]] = {}
    stack = Stack(UpConfig.on_free_ports(index=str(index_all), generator=str(generator)))
    try:
        gateway = stack.start()
        admin = AdminConfig(gateway=gateway, admin_token=admin_token)
        results["retrieve"] = evaluate(questions_all, out / "retrieve", gateway, "retrieve", (20,), 0, options.seed)
        for mode in GENERATION_MODES:
            ks = (1,) if mode == Mode.CLOSED_BOOK.value else KS
            results[mode] = evaluate(questions_all, out / mode, gateway, mode, ks, options.sample, options.seed)
        # Knowledge update: questions of each half against each half's index, swapping while serving.
        update: dict[tuple[int, int], dict] = {}
        for index in (0, 1):
            swap(admin, index_half[index].version, index_half[index].name)
            for asked in (0, 1):
                run = out / f"update-q{asked}-index{index}"
                update[(asked, index)] = evaluate(
                    questions_half[asked], run, gateway, "token", (5,), options.sample, options.seed
                )[0]
    finally:
        stack.stop()
    write_report(out, options, results, update, index_all, index_half)


def write_report(
    out: Path, options: argparse.Namespace, results: dict, update: dict, index_all: IndexRef, index_half: list[IndexRef]
) -> None:
    retrieval = results["retrieve"][0]
    lines = [
        "# SQuAD-open on the demo models",
        "",
        f"Reproduce: `python bench/squad_open.py --sample {options.sample} --seed {options.seed}` (resumable; about an hour on",
        f"2 CPU cores). Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "Index: the 10,033 Wikipedia lead paragraphs + the 2,067 SQuAD v1.1 dev paragraphs (all-MiniLM-L6-v2, exact search,",
        f"{index_all}). Questions: the public SQuAD dev questions, asked without their paragraph. Generator:",
        "Qwen2.5-Coder-0.5B-Instruct, greedy, frozen (no RAG fine-tuning); p(z|x) = softmax(cosine / 0.05).",
        "",
        f"Retrieval over all {retrieval['n']} public questions: recall@1 {retrieval['recall_at_1']:.3f}, recall@5 "
        f"{retrieval['recall_at_5']:.3f}, recall@20 {retrieval['recall_at_20']:.3f}.",
        "",
        f"Generation on a seeded sample of {options.sample} questions (seed {options.seed}); EM and F1 after SQuAD's normalisation,",
        "recall@k of the gold paragraph among the k passages the generator read:",
        "",
        markdown_table([s for mode in GENERATION_MODES for s in results[mode]]),
        "",
        "## Knowledge update (the paper's section 4.5)",
        "",
        "Two indexes: the Wikipedia leads plus the paragraphs of one half of SQuAD's articles (alternating by article), "
        f"{index_half[0]} and {index_half[1]}. The questions of each half are asked against both indexes, swapping the running",
        "retrievers between them (RAG-Token, k = 5):",
        "",
        "| questions | index | EM | F1 | recall@5 |",
        "|---|---|---|---|---|",
    ]
    for (asked, index), s in sorted(update.items()):
        label = "matched" if asked == index else "mismatched"
        lines.append(
            f"| half {asked} | half {index} ({label}) | {s['exact_match']:.3f} | {s['f1']:.3f} | {s['recall_at_k']:.3f} |"
        )
    matched = [update[(h, h)] for h in (0, 1)]
    mismatched = [update[(h, 1 - h)] for h in (0, 1)]
    mean = lambda xs, key: sum(x[key] for x in xs) / len(xs)  # noqa: E731
    lines += [
        "",
        f"Matched: EM {mean(matched, 'exact_match'):.3f}, F1 {mean(matched, 'f1'):.3f}; mismatched: EM "
        f"{mean(mismatched, 'exact_match'):.3f}, F1 {mean(mismatched, 'f1'):.3f}.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
