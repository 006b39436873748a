"""The probes of issue R (hardening II), repeated against the services as `rag serve` child processes.

    python bench/hardening_probes.py [--generator DIR] [--out docs/hardening-probes.json]

1. a 2,000-character question of astral characters with a 2 s deadline (k = 50 on a tiny random 2-layer model,
   k = 3 on SmolLM2-135M), at the default token limits and with them lifted: its status, and how long the next
   ordinary Ask takes (it waits for the generator to let go of the first);
2. two gateways over the same retrievers, reconciling every second: a swap through one, a rollback through the
   other, then how often the active version changes in the next 15 s;
3. Score with 50 passages and 32 answers of ~250 tokens, 1 s deadline: how long the next Generate takes;
5. ten bad admin tokens from the gateway's host, then the right one: its status;
8. 500 connections that send nothing to a metrics port: the threads the service holds.

The services run tiny random models unless `--generator` names a real one (SmolLM2-135M-Instruct is what the
issue used: probe 1's second row and probe 3). Prints one JSON object per probe and writes them all to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.auth import bearer  # noqa: E402
from rag.clients import wait_until_serving  # noqa: E402
from rag.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    passage_pb2,
)
from rag_cli.testing import random_models  # noqa: E402
from rag_cli.up import Child, spawn  # noqa: E402
from retriever_svc.build import build_index  # noqa: E402
from retriever_svc.encoders import load_encoder  # noqa: E402

ASTRAL = "\U0001f600" * 2000
TOKEN = "probe-admin-token-3b9f0e7c21d64a58"
LIFTED = {"max_question_tokens": 10**6, "max_prompt_tokens": 10**9}


def serve(service: str, **flags: object) -> Child:
    child = spawn(service, {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **flags})
    if not wait_until_serving(child.learn_address(120), 600):
        raise SystemExit(f"{service} did not become ready")
    return child


def stop(*children: Child) -> None:
    for child in children:
        child.process.terminate()
    for child in children:
        child.process.wait(60)


def timed(call: Any) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        call()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return code, round(time.perf_counter() - started, 2)


def corpus(tmp: Path, version: str, n: int = 60) -> Path:
    path = tmp / f"corpus-{version}.jsonl"
    records = [{"id": f"{version}-{i}", "title": f"Topic {i}", "text": f"Topic {i} is described here ({version})."}
               for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stall(root: Path, generator: Path, k: int, label: str) -> dict[str, Any]:
    """Probe 1 at the default limits and with them lifted."""
    rows = {}
    retriever = serve("retriever", index_root=root, index="kb", admin_token=TOKEN)
    for limits, flags in (("default limits", {}), ("limits lifted", LIFTED)):
        generator_child = serve("generator", generator=generator, **flags)
        gateway = serve("gateway", retrievers=retriever.address, generator_address=generator_child.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            ordinary = gateway_pb2.AskRequest(question="What is topic 7?", k=k)
            stub.Ask(ordinary, timeout=600)  # warm
            _, normal = timed(lambda: stub.Ask(ordinary, timeout=600))
            heavy_code, heavy_s = timed(
                lambda: stub.Ask(gateway_pb2.AskRequest(question=ASTRAL, k=k), timeout=2)  # noqa: B023
            )
            _, after = timed(lambda: stub.Ask(ordinary, timeout=600))
        rows[limits] = {"heavy": heavy_code, "heavy_s": heavy_s, "next_ask_s": after, "ordinary_ask_s": normal}
        stop(gateway, generator_child)
    stop(retriever)
    return {"probe": f"1: astral question, 2 s deadline, k={k}, {label}", **rows}


def score_stall(generator: Path) -> dict[str, Any]:
    child = serve("generator", generator=generator)
    passages = [passage_pb2.Passage(id=f"p{i}", title=f"Topic {i}", text=f"Topic {i} is described here. " * 20,
                                    score=1.0) for i in range(50)]  # fmt: skip
    answers = [f"{i} " + "penicillin was discovered " * 60 for i in range(32)]
    with grpc.insecure_channel(child.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        quick = generator_pb2.GenerateRequest(question="What is topic 1?", passages=passages[:3])
        stub.Generate(quick, timeout=600)
        _, normal = timed(lambda: stub.Generate(quick, timeout=600))
        heavy = generator_pb2.ScoreRequest(question="Who?", passages=passages, answers=answers)
        code, heavy_s = timed(lambda: stub.Score(heavy, timeout=1))
        _, after = timed(lambda: stub.Generate(quick, timeout=600))
    stop(child)
    return {"probe": "3: Score, 50 passages x 32 answers, 1 s deadline", "score": code, "score_s": heavy_s,
            "next_generate_s": after, "ordinary_generate_s": normal}  # fmt: skip


def two_gateways(root: Path, generator: Path) -> dict[str, Any]:
    retrievers = [serve("retriever", index_root=root, index="kb@v1", admin_token=TOKEN) for _ in range(2)]
    replicas = "|".join(r.address for r in retrievers)
    generator_child = serve("generator", generator=generator)
    gateways = [serve("gateway", retrievers=replicas, generator_address=generator_child.address, admin_token=TOKEN,
                      reconcile_seconds=1) for _ in range(2)]  # fmt: skip
    channels = [grpc.insecure_channel(g.address) for g in gateways]
    admins = [admin_pb2_grpc.AdminServiceStub(c) for c in channels]
    admins[0].SwapIndex(admin_pb2.SwapIndexRequest(version="v2"), timeout=120, metadata=bearer(TOKEN))
    admins[1].SwapIndex(admin_pb2.SwapIndexRequest(version="v1"), timeout=120, metadata=bearer(TOKEN))
    ask = gateway_pb2_grpc.GatewayServiceStub(channels[0])
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        reply = ask.Ask(gateway_pb2.AskRequest(question="What is topic 7?", k=2, retrieve_only=True), timeout=60)
        if not seen or seen[-1] != reply.index_version:
            seen.append(reply.index_version)
        time.sleep(0.1)
    for channel in channels:
        channel.close()
    stop(*gateways, generator_child, *retrievers)
    return {"probe": "2: swap via one gateway, rollback via the other, 15 s", "versions_seen": seen,
            "flips": len(seen) - 1}  # fmt: skip


def admin_flood(root: Path, generator: Path) -> dict[str, Any]:
    retriever = serve("retriever", index_root=root, index="kb@v1", admin_token=TOKEN)
    generator_child = serve("generator", generator=generator)
    gateway = serve("gateway", retrievers=retriever.address, generator_address=generator_child.address,
                    admin_token=TOKEN)  # fmt: skip
    codes = []
    with grpc.insecure_channel(gateway.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for _ in range(12):
            codes.append(timed(lambda: admin.ListIndexStatus(admin_pb2.ListIndexStatusRequest(), timeout=30,
                                                             metadata=bearer("guess")))[0])  # fmt: skip
        right, _ = timed(lambda: admin.SwapIndex(admin_pb2.SwapIndexRequest(version="v2"), timeout=120,
                                                 metadata=bearer(TOKEN)))  # fmt: skip
    stop(gateway, generator_child, retriever)
    return {"probe": "5: 12 bad admin tokens, then a swap with the right one", "bad": codes, "right": right}


def metrics_threads(generator: Path) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = spawn("generator", {"host": "127.0.0.1", "port": 0, "metrics_port": port, "generator": generator})
    wait_until_serving(child.learn_address(120), 600)
    threads = lambda: int(re.findall(r"Threads:\s+(\d+)", Path(f"/proc/{child.process.pid}/status").read_text())[0])  # noqa: E731
    before, most = threads(), 0
    idle = []
    for i in range(500):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
        except OSError:  # the accept queue is full
            pass
        if i % 10 == 0:
            most = max(most, threads())
    for _ in range(30):  # the next 3 s: idle connections are dropped after 5 s of silence
        most = max(most, threads())
        time.sleep(0.1)
    held = most
    for sock in idle:
        sock.close()
    stop(child)
    return {"probe": "8: 500 idle connections to the metrics port", "connected": len(idle), "threads_before": before,
            "threads_held": held}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="", help="a real generator for probes 1 (second row) and 3")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiny = random_models.save_causal_lm(tmp / "lm")
        encoder_dir = random_models.save_sentence_encoder(tmp / "st")
        encoder = load_encoder(f"sentence-transformer:{encoder_dir}")
        for version in ("v1", "v2"):
            build_index(corpus(tmp, version), "jsonl", tmp / "indexes", "kb", encoder, show_progress=False)
        probes = [
            lambda: stall(tmp / "indexes", tiny, 50, "tiny 2-layer model"),
            *([lambda: stall(tmp / "indexes", Path(args.generator), 3, Path(args.generator).name),
               lambda: score_stall(Path(args.generator))] if args.generator else []),
            lambda: two_gateways(tmp / "indexes", tiny),
            lambda: admin_flood(tmp / "indexes", tiny),
            lambda: metrics_threads(tiny),
        ]  # fmt: skip
        for probe in probes:
            results.append(probe())
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
