"""Overload: successful Asks per second at 8, 32 and 128 clients, with the gateway's admission control on (its
defaults: 16 in flight, 16 waiting) and off (limits too high to matter, as before it existed).

    python bench/overload.py [--seconds 20] [--clients 8,32,128]

The services run as `rag serve` child processes (as `rag up` starts them) on tiny random models, so that the
clients (threads of this process) do not share a GIL with them. The generator queues 16 requests; beyond that
it refuses with RESOURCE_EXHAUSTED. Without admission control that refusal comes after retrieval, so under
overload the retriever works for answers that are never generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.clients import wait_until_serving  # noqa: E402
from rag.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2  # noqa: E402
from rag_cli.testing import random_models  # noqa: E402
from rag_cli.up import Child, spawn  # noqa: E402
from retriever_svc.build import build_index  # noqa: E402
from retriever_svc.encoders import load_encoder  # noqa: E402

OFF = 1_000_000


def serve(service: str, **flags: object) -> Child:
    child = spawn(service, {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **flags})
    if not wait_until_serving(child.learn_address(120), 600):
        raise SystemExit(f"{service} did not become ready")
    return child


def hammer(gateway: str, clients: int, seconds: float) -> Counter[str]:
    """Every client asks again as soon as it has an answer or a refusal, for `seconds`; outcomes by status."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    request = gateway_pb2.AskRequest(
        question="what is document 7 about?", k=5, options=generator_pb2.DecodingOptions(max_new_tokens=8)
    )

    def client() -> None:
        with grpc.insecure_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            while time.monotonic() < stop:
                try:
                    stub.Ask(request, timeout=60)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                    if code == "RESOURCE_EXHAUSTED":
                        time.sleep(0.05)  # a client backs off a little before it retries
                with lock:
                    outcomes[code] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", default="8,32,128")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rag-overload-") as tmp:
        work = Path(tmp)
        encoder = f"sentence-transformer:{random_models.save_sentence_encoder(work / 'encoder')}"
        corpus = work / "corpus.jsonl"
        corpus.write_text(
            "".join(
                json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": f"document {i} about topic {i % 50} " * 20})
                + "\n"
                for i in range(2000)
            )
        )
        build_index(corpus, "jsonl", work / "indexes", "bench", load_encoder(encoder), show_progress=False)
        checkpoint = work / "rag"
        random_models.save_rag_checkpoint(checkpoint, n_docs=5)
        retriever = serve("retriever", index_root=work / "indexes", index="bench")
        generator = serve("generator", generator=checkpoint, max_queue=16)
        try:
            for admission, (in_flight, waiting) in (("on", (16, 16)), ("off", (OFF, OFF))):
                gateway = serve(
                    "gateway", retrievers=retriever.address, generator_address=generator.address,
                    max_in_flight=in_flight, max_waiting=waiting,
                )  # fmt: skip
                try:
                    hammer(gateway.address, 4, 3)  # warm up
                    for clients in (int(c) for c in options.clients.split(",")):
                        outcomes = hammer(gateway.address, clients, options.seconds)
                        ok = outcomes["OK"] / options.seconds
                        print(f"admission {admission:3}  {clients:4} clients  {ok:7.1f} answers/s  {dict(outcomes)}")
                finally:
                    gateway.process.terminate()
                    gateway.process.wait()
        finally:
            for child in (retriever, generator):
                child.process.terminate()
                child.process.wait()


if __name__ == "__main__":
    main()
