"""`rag eval`: a question set through the running gateway, scored as open-domain QA.

    rag eval QUESTIONS [--mode token|sequence|closed-book|concat|retrieve] [--k K] [--limit N] [--seed S]
                       [--gateway ADDR] [--out DIR] [--ks 1,5,10] [--json]

Question sets: JSONL `{"question", "answers": [...], "gold_passage"?}`, SQuAD v1.1 JSON (gold passage
`sq-<title>-<paragraph>`), or DPR's QA TSV (`question<TAB>['answer', ...]`, CSV-quoted). Scores: exact match
and token F1 after SQuAD's normalisation (lower case, no punctuation, no articles, single spaces), each the
maximum over the gold answers; recall@k of the gold passage (a passage split into pieces counts by any
piece); latency percentiles. `--mode retrieve` evaluates retrieval alone. With `--out DIR` every answer is
appended to DIR/results.jsonl as it comes, and a rerun skips what is there (resumable); DIR also gets
summary.json and table.md, and with `--ks` a plot of quality against k (quality_vs_k.png).
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rag.config import option
from rag.errors import InvalidArgument
from rag.files import open_text, require_regular_file, write_atomically
from rag.types import AskRequest, DecodingOptions, Mode, RetrievalMode
from rag_cli.ask import ask

RETRIEVE = "retrieve"  # retrieval only: no answer is generated
MODES = (*(m.value for m in Mode), RETRIEVE)
FORMATS = ("jsonl", "squad", "dpr-qa")


@dataclass
class EvalConfig:
    gateway: str = option("127.0.0.1:50051", "gateway address")
    mode: str = option("token", f"one of {', '.join(MODES)} (retrieve: retrieval only)")
    k: int = option(5, "passages per question")
    retrieval: str = option("", "dense, lexical or hybrid; empty: the gateway's default")
    ks: str = option("", "comma-separated k values to sweep instead of --k (writes a plot with --out)")
    limit: int = option(0, "evaluate a random sample of this many questions (0 = all)")
    seed: int = option(0, "seed of that sample")
    questions_format: str = option("", f"{', '.join(FORMATS)}; default: from the file")
    max_new_tokens: int = option(0, "answer length limit; 0 = the generator's default")
    out: str = option("", "directory for results.jsonl (resumable), summary.json, table.md, quality_vs_k.png")
    timeout: float = option(600.0, "deadline per question, seconds")
    progress: bool = option(True, "show a progress bar")
    json: bool = option(False, "end with one JSON line holding the summary")
    against: str = option(
        "", "a previous run's --out directory: compare question by question (wins, losses, a sign test)"
    )


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answers: tuple[str, ...]
    gold_passage: str = ""


# ------------------------------------------------------------------------------------------------ reading


def guess_format(path: Path) -> str:
    suffix = Path(path.name.removesuffix(".gz")).suffix  # dev.json.gz is SQuAD too
    if suffix == ".json":
        return "squad"
    if suffix in (".tsv", ".csv"):
        return "dpr-qa"
    return "jsonl"


def read_examples(path: Path, fmt: str = "") -> list[Example]:
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown question-set format {fmt!r}; use one of {', '.join(FORMATS)}")
    require_regular_file(path, "question set", "a JSONL, SQuAD JSON or DPR QA TSV file")
    text = _read_text(path)
    examples = {"jsonl": _jsonl, "squad": _squad, "dpr-qa": _dpr_qa}[fmt](text, path)
    if not examples:
        raise InvalidArgument(f"{path} holds no questions")
    return examples


def _read_text(path: Path) -> str:
    with open_text(path) as handle:
        return handle.read()


def _jsonl(text: str, path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers = record["answers"]
            if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
                raise TypeError("answers must be a list of strings")
            examples.append(
                Example(
                    str(record.get("id", number)), record["question"], tuple(answers), record.get("gold_passage") or ""
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InvalidArgument(f'{path}:{number}: expected {{"question", "answers": [...]}} ({err})') from err
    return examples


def _squad(text: str, path: Path) -> list[Example]:
    try:
        articles = json.loads(text)["data"]
    except (json.JSONDecodeError, KeyError) as err:
        raise InvalidArgument(f"{path}: not a SQuAD v1.1 file (no 'data': {err})") from err
    examples = []
    for article in articles:
        title = article["title"]
        for n, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))  # unique, in order
                examples.append(Example(qa["id"], qa["question"], answers, f"sq-{title}-{n}"))
    return examples


def _dpr_qa(text: str, path: Path) -> list[Example]:
    examples = []
    for number, row in enumerate(csv.reader(text.splitlines(), delimiter="\t"), 1):
        if not row:
            continue
        if len(row) < 2:
            raise InvalidArgument(f"{path}:{number}: expected question<TAB>['answer', ...]")
        try:
            answers = ast.literal_eval(row[1])
        except (ValueError, SyntaxError) as err:
            raise InvalidArgument(f"{path}:{number}: the answers are not a Python list literal: {row[1]!r}") from err
        if isinstance(answers, str):
            answers = [answers]
        examples.append(Example(str(number), row[0], tuple(str(a) for a in answers)))
    return examples


def sample(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if not limit or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


# ------------------------------------------------------------------------------------------------ scoring


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(g)) for g in golds), default=0.0)


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def gold_rank(passage_ids: Sequence[str], gold: str) -> int | None:
    """1-based rank of the gold passage among the retrieved ids (any piece of a split passage counts)."""
    for rank, passage_id in enumerate(passage_ids, 1):
        if passage_id == gold or passage_id.startswith(gold + "-"):
            return rank
    return None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ------------------------------------------------------------------------------------------------ running


def evaluate_one(example: Example, request: AskRequest, gateway: str, timeout: float) -> dict[str, Any]:
    answer = ask(replace(request, question=example.question), gateway, timeout)
    ids = [s.passage.id for s in answer.sources]
    record = {
        "id": example.id,
        "mode": RETRIEVE if request.retrieve_only else request.options.mode.value,
        "k": request.k,
        "question": example.question,
        "answers": list(example.answers),
        "prediction": answer.text,
        "retrieval": answer.retrieval.value,
        "requested_retrieval": request.retrieval.value if request.retrieval else "",
        "retrieved": ids,
        "scores": [
            {"score": s.passage.score, "dense": s.passage.dense_score, "lexical": s.passage.lexical_score}
            for s in answer.sources
        ],
        "gold_rank": gold_rank(ids, example.gold_passage) if example.gold_passage else None,
        "has_gold": bool(example.gold_passage),
        "latency_ms": answer.timings.total_ms,
    }
    if not request.retrieve_only:
        record["exact_match"] = exact_match(answer.text, example.answers)
        record["f1"] = f1_score(answer.text, example.answers)
    return record


def summarize(records: list[dict[str, Any]], mode: str, k: int) -> dict[str, Any]:
    served = sorted({r.get("retrieval", "dense") for r in records})
    summary: dict[str, Any] = {"mode": mode, "retrieval": "+".join(served), "k": k, "n": len(records)}
    if mode != RETRIEVE:
        summary["exact_match"] = sum(r["exact_match"] for r in records) / max(1, len(records))
        summary["f1"] = sum(r["f1"] for r in records) / max(1, len(records))
    with_gold = [r for r in records if r["has_gold"]]
    if with_gold:
        for cutoff in sorted({c for c in (1, 5, 10, 20) if c <= k} | {k}):
            hits = sum(1 for r in with_gold if r["gold_rank"] is not None and r["gold_rank"] <= cutoff)
            summary[f"recall_at_{cutoff}"] = hits / len(with_gold)
        summary["recall_at_k"] = summary[f"recall_at_{k}"]
    latencies = [r["latency_ms"] for r in records]
    summary["latency_ms"] = {
        q: round(percentile(latencies, p), 1) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }
    return summary


def previous_run(run: Path) -> list[dict[str, Any]]:
    """A previous run's records (its --out directory, or its results.jsonl)."""
    path = run / "results.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise InvalidArgument(f"--against {run}: no results.jsonl there (give a previous run's --out directory)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_of(records: list[dict[str, Any]], mode: str, k: int) -> dict[str, dict[str, Any]]:
    """The records of `mode` and `k`, by question id (the last one where there are several)."""
    return {r["id"]: r for r in records if r["mode"] == mode and r["k"] == k}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if both runs were as good."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(before: dict[str, dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired comparison of the questions both runs answered: per measure, the means, the questions this run
    does better (wins) and worse (losses) on, and the sign test's p-value (ties left out)."""
    pairs = [(before[r["id"]], r) for r in after if r["id"] in before]
    measures: dict[str, Any] = {}
    if pairs and "exact_match" in pairs[0][1] and "exact_match" in pairs[0][0]:
        measures["exact_match"] = lambda r: r["exact_match"]
        measures["f1"] = lambda r: r["f1"]
    if pairs and all(a["has_gold"] for a, _ in pairs):
        rank = lambda r: r["gold_rank"] if r["gold_rank"] is not None else math.inf  # noqa: E731
        measures["recall_at_1"] = lambda r: float(rank(r) <= 1)
        measures["recall_at_k"] = lambda r: float(rank(r) <= r["k"])
        measures["gold_rank"] = lambda r: -rank(r)  # higher is better, as for the others
    served = lambda side: "+".join(sorted({pair[side].get("retrieval", "dense") for pair in pairs}))  # noqa: E731
    # What each run retrieved with, so that a comparison across retrieval modes is not read as one within a mode.
    result: dict[str, Any] = {"n": len(pairs), "retrieval": {"before": served(0), "after": served(1)}}
    for name, value in measures.items():
        wins = sum(1 for a, b in pairs if value(b) > value(a))
        losses = sum(1 for a, b in pairs if value(b) < value(a))
        entry: dict[str, Any] = {"wins": wins, "losses": losses, "ties": len(pairs) - wins - losses}
        if name != "gold_rank":
            entry["before"] = sum(value(a) for a, _ in pairs) / len(pairs)
            entry["after"] = sum(value(b) for _, b in pairs) / len(pairs)
        entry["sign_test_p"] = round(sign_test(wins, losses), 4)
        result[name] = entry
    return result


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | retrieval | k | n | EM | F1 | recall@k | p50 latency (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        em = f"{s['exact_match']:.3f}" if "exact_match" in s else "-"
        f1 = f"{s['f1']:.3f}" if "f1" in s else "-"
        recall = f"{s['recall_at_k']:.3f}" if "recall_at_k" in s else "-"
        lines.append(
            f"| {s['mode']} | {s.get('retrieval', 'dense')} | {s['k']} | {s['n']} | {em} | {f1} | {recall} | "
            f"{s['latency_ms']['p50'] / 1000:.2f} |"
        )
    for s in summaries:
        if "paired" in s:
            served = s["paired"]["retrieval"]
            lines += ["", f"Against the previous run ({served['before']} retrieval, this run {served['after']}), k = "
                      f"{s['k']}, {s['paired']['n']} questions in both:", "",
                      "| measure | before | after | wins | losses | ties | sign test p |", "|---|---|---|---|---|---|---|"]  # fmt: skip
            for name, m in s["paired"].items():
                if name not in ("n", "retrieval"):
                    before, after = (f"{m[key]:.3f}" if key in m else "-" for key in ("before", "after"))
                    lines.append(
                        f"| {name} | {before} | {after} | {m['wins']} | {m['losses']} | {m['ties']} | {m['sign_test_p']} |"
                    )
    return "\n".join(lines)


def plot_quality_vs_k(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [s["k"] for s in summaries]
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("exact_match", "exact match"), ("f1", "F1"), ("recall_at_k", "recall@k")):
        if all(key in s for s in summaries):
            axes.plot(ks, [s[key] for s in summaries], marker="o", label=label)
    axes.set_xlabel("k (passages)")
    axes.set_ylabel("score")
    axes.set_ylim(0, 1)
    axes.set_title(f"{summaries[0]['mode']}: quality against k (n={summaries[0]['n']})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_eval(questions: Path, config: EvalConfig) -> list[dict[str, Any]]:
    if config.mode not in MODES:
        raise InvalidArgument(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    retrieve_only = config.mode == RETRIEVE
    options = DecodingOptions(
        mode=Mode.TOKEN if retrieve_only else Mode.parse(config.mode), max_new_tokens=config.max_new_tokens
    )
    ks = [int(k) for k in config.ks.split(",") if k.strip()] if config.ks else [config.k]
    examples = sample(read_examples(questions, config.questions_format), config.limit, config.seed)
    out = Path(config.out) if config.out else None
    retrieval = RetrievalMode.parse(config.retrieval) if config.retrieval else None
    against = previous_run(Path(config.against)) if config.against else None  # checked before any question
    done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "results.jsonl").exists():
            for line in (out / "results.jsonl").read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    done[(record["mode"], record.get("requested_retrieval", ""), record["k"], record["id"])] = record
    summaries = []
    for k in ks:
        request = AskRequest("", k, options, retrieve_only, retrieval)  # each example's question goes in
        records = []
        with tqdm(
            total=len(examples),
            desc=f"{config.mode} k={k}",
            unit="question",
            disable=not config.progress,
            file=sys.stderr,
        ) as bar:
            for example in examples:
                key = (config.mode, config.retrieval, k, example.id)
                if key not in done:
                    done[key] = evaluate_one(example, request, config.gateway, config.timeout)
                    if out is not None:
                        with (out / "results.jsonl").open("a", encoding="utf-8") as handle:
                            handle.write(json.dumps(done[key], ensure_ascii=False) + "\n")
                records.append(done[key])
                bar.update()
        summary = summarize(records, config.mode, k)
        if against is not None:
            summary["paired"] = compare(records_of(against, config.mode, k), records)
        summaries.append(summary)
    if out is not None:
        write_atomically(out / "summary.json", json.dumps(summaries, indent=2))
        write_atomically(out / "table.md", markdown_table(summaries) + "\n")
        if len(summaries) > 1:
            plot_quality_vs_k(summaries, out / "quality_vs_k.png")
    return summaries
