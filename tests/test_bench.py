"""`rag bench --quick` end to end: every section runs, compares with its reference (identical tokens and
identical top-k are asserted inside), and reports a ratio and its goal. Speed goals are never asserted here."""

from __future__ import annotations

import json

import pytest

from rag_cli.main import main as rag_cli

pytestmark = pytest.mark.slow


def test_rag_bench_quick_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert rag_cli(["bench", "--quick", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # --json: stdout is one JSON document, nothing else
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] >= 1  # every figure names its machine
    figures = report["figures"]
    assert {f["section"] for f in figures} == {
        "generator",
        "retrieval",
        "lexical",
        "gateway",
        "concurrency",
        "build",
        "latency",
    }
    names = " | ".join(f["name"] for f in figures)
    for expected in ("RAG-Token greedy", "RAG-Token beam 4", "RAG-Sequence thorough, beam 1", "RAG-Sequence thorough, beam 4",
                     "RAG-Sequence fast", "1 query", "64 queries", "HNSW", "lexical index build", "hybrid search", "Ask end to end", "8 concurrent clients", "index build",
                     "Ask RAG-Token, float32, k=5: median, passages cold", "Ask RAG-Sequence, int8, k=5: median, passages warm",
                     "RAG-Token, float32: first token, passages warm", "RAG-Token, int8: against the floor",
                     "answers/s with 8 clients", "1 client, passages cached",
                     "Ask RAG-Token, float32, k=5: median, generator restarted, passages on disk"):  # fmt: skip
        assert expected in names
    restarted = next(f for f in figures if "generator restarted" in f["name"])
    assert "100% of passage segments cached" in restarted["note"]  # every segment read from the disk tier
    for figure in figures:
        assert figure["ours_s"] > 0 and figure["reference_s"] > 0 and figure["ratio"] > 0
        assert figure["met"] in (True, False, None) and (figure["met"] is None) == (figure["goal"] == "")
