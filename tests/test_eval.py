"""`rag eval`: scorers against hand-checked cases, every question-set format (with its quoting traps), and the
command end to end against the running services, resumable."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from rag.errors import InvalidArgument
from rag_cli.eval import (
    EvalConfig,
    Example,
    exact_match,
    f1_score,
    gold_rank,
    normalize_answer,
    percentile,
    read_examples,
    run_eval,
    sample,
    sign_test,
)
from rag_cli.main import main as rag_cli
from tests.conftest import Services


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("an apple, a pear and THE plum.", "apple pear and plum"),
        ("Levi's Stadium", "levis stadium"),
        ("  1,000 ", "1000"),
        ("Theatre", "theatre"),  # "the" only as a word
    ],
)
def test_squad_normalisation(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_take_the_best_gold() -> None:
    golds = ["Denver Broncos", "the Broncos"]
    assert exact_match("the denver broncos", golds) == 1.0
    assert exact_match("Broncos", golds) == 1.0
    assert exact_match("Denver", golds) == 0.0
    assert f1_score("Denver", ["Denver Broncos"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert f1_score("the Denver Broncos won", golds) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # best gold
    assert f1_score("Carolina Panthers", golds) == 0.0
    assert f1_score("", golds) == 0.0 and exact_match("", golds) == 0.0
    assert f1_score("broncos broncos", ["broncos"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets


def test_recall_counts_any_piece_of_a_split_gold_passage() -> None:
    assert gold_rank(["wv1", "sq-A-1-0", "sq-A-1-1"], "sq-A-1") == 2
    assert gold_rank(["sq-A-10", "sq-A-1"], "sq-A-1") == 2  # sq-A-10 is another paragraph
    assert gold_rank(["sq-A-10-0"], "sq-A-1") is None


def test_percentiles_interpolate() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)


def test_jsonl_questions(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "a", "question": "Q1?", "answers": ["x", "y"], "gold_passage": "p1"}\n\n{"question": "Q2?", "answers": ["z"]}\n'
    )
    assert read_examples(path) == [Example("a", "Q1?", ("x", "y"), "p1"), Example("3", "Q2?", ("z",), "")]
    path.write_text('{"question": "Q?", "answers": "not a list"}\n')
    with pytest.raises(InvalidArgument, match="q.jsonl:1"):
        read_examples(path)


@pytest.mark.parametrize("name", ["dev-v1.1.json", "dev-v1.1.json.gz"])
def test_squad_json_questions_get_their_paragraph_as_gold(tmp_path: Path, name: str) -> None:
    squad = {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [
        {"context": "...", "qas": [{"id": "q0", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 0}, {"text": "Denver Broncos", "answer_start": 9}, {"text": "Broncos", "answer_start": 7}]}]},
        {"context": "...", "qas": [{"id": "q1", "question": "Where?", "answers": [{"text": "Levi's Stadium", "answer_start": 3}]}]},
    ]}]}  # fmt: skip
    path = tmp_path / name
    path.write_bytes(gzip.compress(json.dumps(squad).encode()) if name.endswith(".gz") else json.dumps(squad).encode())
    assert read_examples(path) == [
        Example("q0", "Who won?", ("Denver Broncos", "Broncos"), "sq-Super_Bowl_50-0"),
        Example("q1", "Where?", ("Levi's Stadium",), "sq-Super_Bowl_50-1"),
    ]


def test_dpr_qa_tsv_with_its_quoting_traps(tmp_path: Path) -> None:
    path = tmp_path / "nq-test.qa.csv"
    path.write_text(
        "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
        "where is the capital\t['Washington, D.C.', 'D.C.']\n"  # commas inside an answer
        "whose son was heracles\t[\"Zeus's son\", 'Zeus']\n"  # an apostrophe: Python quotes it with "
        '"what does ""carpe diem"" mean"\t"[""seize the day""]"\n'  # CSV-quoted fields with doubled quotes
        "how many\t['7']\n",
        encoding="utf-8",
    )
    assert [(e.question, e.answers) for e in read_examples(path)] == [
        ("who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",)),
        ("where is the capital", ("Washington, D.C.", "D.C.")),
        ("whose son was heracles", ("Zeus's son", "Zeus")),
        ('what does "carpe diem" mean', ("seize the day",)),
        ("how many", ("7",)),
    ]
    path.write_text("a question\tnot a list literal [\n")
    with pytest.raises(InvalidArgument, match="not a Python list literal"):
        read_examples(path)


def test_sampling_is_seeded() -> None:
    examples = [Example(str(i), f"q{i}", ("a",)) for i in range(50)]
    assert sample(examples, 10, seed=1) == sample(examples, 10, seed=1) != sample(examples, 10, seed=2)
    assert sample(examples, 0, seed=1) == examples


def _question_set(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    rows = [
        {
            "id": "1",
            "question": "Who discovered penicillin?",
            "answers": ["Alexander Fleming"],
            "gold_passage": "fleming",
        },
        {"id": "2", "question": "What is the capital of France?", "answers": ["Paris"], "gold_passage": "paris"},
        {
            "id": "3",
            "question": "What is the highest mountain?",
            "answers": ["Mount Everest"],
            "gold_passage": "everest",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("mode", ["token", "sequence", "closed-book", "concat", "retrieve"])
def test_rag_eval_end_to_end(services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    args = [
        "eval",
        str(_question_set(tmp_path)),
        "--gateway",
        services.gateway,
        "--mode",
        mode,
        "--k",
        "3",
        "--max-new-tokens",
        "4",
        "--json",
        "--no-progress",
    ]
    assert rag_cli(args) == 0
    summary = json.loads(capsys.readouterr().out)  # --json: stdout is the JSON document alone
    assert summary["n"] == 3 and summary["mode"] == mode and summary["k"] == 3
    assert summary["retrieval"] == "hybrid"  # the retrievers' default, where the index has a lexical index
    assert 0 <= summary["recall_at_k"] <= 1 and summary["recall_at_1"] <= summary["recall_at_k"]
    assert summary["latency_ms"]["p50"] > 0
    if mode == "retrieve":
        assert "exact_match" not in summary
    else:
        assert 0 <= summary["exact_match"] <= summary["f1"] <= 1
    assert rag_cli([a for a in args if a != "--json"]) == 0  # without it, the Markdown table
    assert capsys.readouterr().out.startswith("| mode | retrieval | k | n | EM | F1 | recall@k |")


@pytest.mark.parametrize("retrieval", ["dense", "lexical", "hybrid"])
def test_rag_eval_retrieval_modes_record_why_each_passage_ranked(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str], retrieval: str
) -> None:
    out = tmp_path / "out"
    args = ["eval", str(_question_set(tmp_path)), "--gateway", services.gateway, "--mode", "retrieve",
            "--retrieval", retrieval, "--ks", "1,3", "--out", str(out), "--json", "--no-progress"]  # fmt: skip
    assert rag_cli(args) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["retrieval"] for s in summaries["sweep"]] == [retrieval, retrieval]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records and all(r["retrieval"] == retrieval for r in records)
    scores = [s for r in records for s in r["scores"]]
    assert scores and all((s["dense"] is not None) == (retrieval != "lexical") for s in scores)
    assert all((s["lexical"] is not None) == (retrieval != "dense") for s in scores)
    if retrieval == "lexical":  # "Who discovered penicillin?" shares words with one passage only
        assert records[0]["retrieved"][0] == "fleming" and records[0]["gold_rank"] == 1


def test_rag_eval_resumes_and_plots_a_k_sweep(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions, out = _question_set(tmp_path), tmp_path / "run"
    args = [
        "eval",
        str(questions),
        "--mode",
        "token",
        "--ks",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
        "--json",
        "--no-progress",
    ]
    assert rag_cli([*args, "--gateway", services.gateway]) == 0
    first = json.loads(capsys.readouterr().out)  # --json: only JSON on stdout
    assert [s["k"] for s in first["sweep"]] == [1, 2, 3]
    assert (out / "quality_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.jsonl").read_text().splitlines()) == 9
    # A rerun finds every answer in results.jsonl: it needs no gateway at all, and gives the same summary.
    assert rag_cli([*args, "--gateway", "127.0.0.1:1"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert len((out / "results.jsonl").read_text().splitlines()) == 9
    assert json.loads((out / "summary.json").read_text()) == first["sweep"]


@pytest.mark.parametrize("case", ["missing", "directory", "device", "fifo"])
def test_rag_eval_names_what_a_question_set_path_is_instead_of_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = {"missing": tmp_path / "nope.jsonl", "directory": tmp_path, "device": Path("/dev/zero")}.get(
        case, tmp_path / "questions.jsonl"
    )
    if case == "fifo":
        os.mkfifo(path)  # nobody writes it: reading would block for ever
    expected = {"missing": "does not exist", "directory": "is a directory"}.get(case, "is not a regular file")
    assert rag_cli(["eval", str(path), "--gateway", "127.0.0.1:9", "--questions-format", "jsonl"]) == 2
    assert expected in capsys.readouterr().err


def test_rag_eval_compares_two_runs_question_by_question(
    services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dense against lexical retrieval on the same questions: wins, losses and ties per measure, counted from the
    two runs' own records, and an exact sign test."""
    questions = _question_set(tmp_path)
    runs = {}
    for retrieval in ("dense", "lexical"):
        runs[retrieval] = tmp_path / retrieval
        args = ["eval", str(questions), "--gateway", services.gateway, "--mode", "retrieve", "--k", "3",
                "--retrieval", retrieval, "--out", str(runs[retrieval]), "--json", "--no-progress"]  # fmt: skip
        if retrieval == "lexical":
            args += ["--against", str(runs["dense"])]
        assert rag_cli(args) == 0
    paired = json.loads(capsys.readouterr().out.splitlines()[-1])["paired"]
    before, after = ({json.loads(line)["id"]: json.loads(line) for line in (runs[r] / "results.jsonl").open()}
                     for r in ("dense", "lexical"))  # fmt: skip
    rank = lambda r: r["gold_rank"] or 99  # noqa: E731
    wins = sum(1 for q in after if rank(after[q]) < rank(before[q]))
    losses = sum(1 for q in after if rank(after[q]) > rank(before[q]))
    assert paired["n"] == 3 and (paired["gold_rank"]["wins"], paired["gold_rank"]["losses"]) == (wins, losses)
    assert paired["retrieval"] == {"before": "dense", "after": "lexical"}  # what each side ran, said
    assert paired["recall_at_1"]["after"] == sum(rank(r) <= 1 for r in after.values()) / 3
    assert "exact_match" not in paired  # retrieval only
    assert sign_test(0, 0) == 1.0 and sign_test(5, 0) == pytest.approx(0.0625) and sign_test(3, 3) == 1.0
    with pytest.raises(InvalidArgument, match="no results.jsonl there"):
        run_eval(questions, EvalConfig(gateway=services.gateway, mode="retrieve", k=3, against=str(tmp_path / "none"),
                                       progress=False))  # fmt: skip
