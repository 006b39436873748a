"""The `rag` command line as users run it: separate processes, `rag up` then `rag ask`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rag.clients import is_serving
from tests.conftest import FACTS, RAG, TinyModels, corpus_records, index_build_args, rag, write_jsonl

TOKEN = "cli-admin-token-5d1f0c9a7e3b4826"


@dataclass
class Up:
    process: subprocess.Popen[str]
    gateway: str
    retriever: str
    generator: str
    output: list[str]
    generator_metrics_port: int


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModels, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("cli-indexes")
    built = rag(*index_build_args(corpus, root, "facts", tiny.encoder_spec, "--shards", "2"))
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip().splitlines()[-1] == "v1"  # the contract: the last stdout line is the version id
    assert "encoding facts" in built.stderr  # progress bar
    return root


def free_port_run(length: int) -> int:
    """The first of `length` consecutive free loopback ports (rag up numbers metrics ports from one base)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            held = []
            for port in range(base, base + length):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture(scope="module")
def up(cli_index: Path, tiny: TinyModels) -> Iterator[Up]:
    metrics_port = free_port_run(4)  # gateway, generator (+1), two retrievers
    process = subprocess.Popen(
        [*RAG, "up", "--index-root", str(cli_index), "--index", "facts", "--generator", str(tiny.causal_lm),
         "--shards", "2", "--port", "0", "--retriever-port", "0", "--generator-port", "0",
         "--metrics-port", str(metrics_port), "--grace-seconds", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAG_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        output.append(line)
        if line.startswith("ready"):
            break
        assert time.monotonic() < deadline, "".join(output)
    match = re.search(r"gateway on (\S+); retrievers (\S+); generator (\S+)", output[-1] if output else "")
    assert match, "".join(output)
    stdout = process.stdout
    threading.Thread(target=lambda: output.extend(stdout), daemon=True).start()
    yield Up(process, match.group(1), match.group(2), match.group(3), output, metrics_port + 1)
    if process.poll() is None:
        process.kill()


def ask_json(up: Up, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = rag("ask", "Who discovered penicillin?", "--gateway", up.gateway, "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # --json: only JSON on stdout


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_ask_json_through_rag_up(up: Up, mode: str) -> None:
    answer = ask_json(up, "--mode", mode, "--k", "3", "--max-new-tokens", "6")
    assert set(answer) >= {"answer", "mode", "index_version", "passages", "timings_ms"}
    assert answer["mode"] == mode and answer["index_version"] == "facts@v1" and answer["answer"]
    assert len(answer["passages"]) == 3
    for passage in answer["passages"]:
        assert set(passage) >= {"id", "title", "text", "score", "posterior"}
    assert sum(p["posterior"] for p in answer["passages"]) == pytest.approx(1, abs=1e-3)
    assert answer["timings_ms"]["total"] >= answer["timings_ms"]["retrieve"] > 0


def test_ask_retrieval_modes_through_rag_up(up: Up) -> None:
    # rag up serves hybrid by default; --retrieval picks per question, and every passage says why it ranked.
    default = ask_json(up, "--k", "3", "--max-new-tokens", "2")
    assert default["retrieval"] == "hybrid"
    assert all(p["dense_score"] is not None and p["lexical_score"] is not None for p in default["passages"])
    lexical = ask_json(up, "--k", "3", "--max-new-tokens", "2", "--retrieval", "lexical")
    assert lexical["retrieval"] == "lexical" and lexical["passages"][0]["id"] == "fleming"
    assert all(p["dense_score"] is None and p["score"] == p["lexical_score"] for p in lexical["passages"])
    dense = ask_json(up, "--k", "3", "--max-new-tokens", "2", env={"RAG_RETRIEVAL": "dense"})
    assert dense["retrieval"] == "dense" and all(p["lexical_score"] is None for p in dense["passages"])
    refused = rag("ask", "Who?", "--gateway", up.gateway, "--retrieval", "fuzzy")
    assert refused.returncode == 2 and "retrieval must be one of dense, lexical, hybrid" in refused.stderr


def test_ask_options_have_env_mirrors_and_flags_win(up: Up) -> None:
    assert len(ask_json(up, env={"RAG_K": "2", "RAG_MAX_NEW_TOKENS": "3"})["passages"]) == 2
    assert len(ask_json(up, "--k", "4", env={"RAG_K": "2"})["passages"]) == 4
    assert "[env RAG_K; default 5]" in " ".join(rag("ask", "--help").stdout.split())


def test_text_output_shows_answer_and_sources(up: Up) -> None:
    result = rag("ask", "Who discovered penicillin?", "--gateway", up.gateway, "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Q: Who discovered penicillin?\nA: ")
    assert "sources by posterior" in result.stdout


def test_version_and_python_m() -> None:
    from rag import __version__

    result = rag("--version")  # rag() runs `python -m rag_cli`, the same command as the `rag` script
    assert result.returncode == 0 and result.stdout.strip() == f"rag {__version__}" and __version__ != "0+unknown"


def test_bad_requests_exit_2_with_the_reason(up: Up) -> None:
    result = rag("ask", "Who?", "--gateway", up.gateway, "--k", "500")
    assert result.returncode == 2
    assert "INVALID_ARGUMENT: k must be in [1, 50], got 500" in result.stderr


def test_client_errors_say_what_to_do_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{free.getsockname()[1]}"
    result = rag("ask", "Who?", "--gateway", nowhere)
    assert result.returncode == 1, result.stderr
    assert f"UNAVAILABLE: cannot reach {nowhere}; is the service running there?" in result.stderr
    assert "Traceback" not in result.stderr and "failed to connect to all addresses" not in result.stderr


def test_index_swap_status_and_list(up: Up, cli_index: Path, tiny: TinyModels, tmp_path: Path) -> None:
    updated = write_jsonl(tmp_path / "updated.jsonl", [dict(r, id=f"new-{r['id']}") for r in corpus_records()])
    built = rag(*index_build_args(updated, cli_index, "facts", tiny.encoder_spec, "--shards", "2"))
    assert built.returncode == 0 and built.stdout.split()[-1] == "v2", built.stderr
    admin = {"RAG_ADMIN_TOKEN": TOKEN}

    swapped = rag("index", "swap", "v2", "--gateway", up.gateway, env=admin)
    assert swapped.returncode == 0, swapped.stderr
    assert swapped.stdout.startswith("swapped facts@v1 -> facts@v2 on 2 retriever(s)")
    answer = ask_json(up, "--k", "4", "--max-new-tokens", "2")
    assert answer["index_version"] == "facts@v2" and all(p["id"].startswith("new-") for p in answer["passages"])

    status = rag("index", "status", "--gateway", up.gateway, env=admin)
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert (
        sorted(r[1] for r in rows) == ["0/2", "1/2"]
        and {r[2] for r in rows} == {"facts@v2"}
        and {r[4] for r in rows} == {"-"}
    )

    listed = rag("index", "list", "--index-root", str(cli_index), "--gateway", up.gateway, env=admin)
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(lines) == {"facts@v1", "facts@v2"}
    assert (
        "(shard 0)" in lines["facts@v2"]
        and "(shard 1)" in lines["facts@v2"]
        and lines["facts@v1"].rstrip().endswith("-")
    )

    refused = rag("index", "swap", "v1", "--gateway", up.gateway, env={"RAG_ADMIN_TOKEN": "wrong"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "RAG_ADMIN_TOKEN" in refused.stderr
    # --json: one JSON document on stdout, for scripts
    rolled_back = rag("index", "swap", "v1", "--gateway", up.gateway, "--json", env=admin)  # rollback
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert json.loads(rolled_back.stdout)["index_version"] == "facts@v1"
    status_json = json.loads(rag("index", "status", "--gateway", up.gateway, "--json", env=admin).stdout)
    assert {s["active_version"] for s in status_json} == {"facts@v1"} and len(status_json) == 2
    listed_json = rag("index", "list", "--index-root", str(cli_index), "--gateway", up.gateway, "--json", env=admin)
    served = {r["index"]: r["served_by"] for r in json.loads(listed_json.stdout)}
    assert len(served["facts@v1"]) == 2 and served["facts@v2"] == []
    assert ask_json(up, "--max-new-tokens", "2")["index_version"] == "facts@v1"


def children_of(pid: int) -> dict[str, int]:
    """The `rag serve SERVICE` children of `pid`, by service (the last of each kind), read from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked
        if parent == pid and b"serve" in command:
            found[command[command.index(b"serve") + 1].decode()] = int(stat.parent.name)
    return found


def answers_again(up: Up, timeout: float = 300) -> float:
    """Seconds until an Ask through the gateway succeeds again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if rag("ask", "Who discovered penicillin?", "--gateway", up.gateway, "--max-new-tokens", "2").returncode == 0:
            return time.monotonic() - started
    raise AssertionError("".join(up.output[-40:]))


@pytest.mark.parametrize("service", ["retriever", "generator"])
def test_rag_up_restarts_a_killed_service_and_the_gateway_reconnects(up: Up, service: str) -> None:
    victim = children_of(up.process.pid)[service]
    os.kill(victim, signal.SIGKILL)
    seconds = answers_again(up)
    print(f"\n{service} kill -9: answering again {seconds:.1f}s later")  # the recovery time, reported in -s runs
    log = "".join(up.output)
    assert re.search(rf"{service} \(\S+\) exited with code -9; restarting it in 1s", log), log[-3000:]
    assert children_of(up.process.pid)[service] != victim and up.process.poll() is None


def test_each_service_exports_only_its_own_metric_families(up: Up) -> None:
    """The gateway used to export the generator's queue gauge (at 0) and every other family of the project."""
    own = {
        0: ("rag_gateway_asks_shed_total", "rag_index_swaps_total"),
        1: ("rag_generator_queue_depth", "rag_generator_model_tokens_total"),
        2: ("rag_index_info", "rag_search_duration_seconds"),
    }
    pages = {}
    for offset in own:
        with urllib.request.urlopen(f"http://127.0.0.1:{up.generator_metrics_port - 1 + offset}/metrics") as reply:
            pages[offset] = reply.read().decode()
    for offset, page in pages.items():
        assert "# TYPE rag_requests_total counter" in page and "process_cpu_seconds_total" in page
        for other, families in own.items():
            for family in families:
                assert (f"# TYPE {family} " in page) == (other == offset), (offset, family)


def test_rag_up_restarts_a_hung_service(up: Up) -> None:
    """A retriever stopped with SIGSTOP (hung: its process exists but answers nothing) used to stay so forever."""
    victim = children_of(up.process.pid)["retriever"]
    os.kill(victim, signal.SIGSTOP)
    seconds = answers_again(up)
    print(f"\nretriever SIGSTOP: answering again {seconds:.1f}s later")
    log = "".join(up.output)
    assert re.search(rf"retriever \(\S+, pid {victim}\) did not answer 3 health checks in a row", log), log[-3000:]
    assert children_of(up.process.pid)["retriever"] != victim and up.process.poll() is None


def generator_queue(up: Up) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{up.generator_metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return float(re.search(r"^rag_generator_queue_depth (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_sigterm_drains_in_flight_requests_then_stops_everything(up: Up) -> None:
    """Runs last in this module: it stops the stack. No sleeps: SIGTERM is sent once the generator's metrics show
    the request in its queue, and the drain grace (300 s) outlasts the request on a machine however busy."""
    slow: dict[str, Any] = {}

    def ask_slowly() -> None:
        started = time.monotonic()
        slow["result"] = rag(
            "ask",
            FACTS[0]["text"],
            "--gateway",
            up.gateway,
            "--num-beams",
            "8",
            "--max-new-tokens",
            "200",
            "--k",
            "20",
            "--json",
        )
        slow["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=ask_slowly)
    thread.start()
    while generator_queue(up) < 1:  # wait until the request is in the generator
        assert thread.is_alive(), slow
        time.sleep(0.05)
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=600) == 0
    thread.join(timeout=60)
    result = slow["result"]
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stderr  # the in-flight request finished
    for address in (up.gateway, up.retriever, up.generator):
        assert not is_serving(address, timeout=1)
    log = "".join(up.output)
    assert "gateway draining" in log and "generator draining" in log
