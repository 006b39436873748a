"""Index swap benchmark: load and activation time, and a retriever's memory before, during and after a swap.

    python bench/swap.py [--passages 300000] [--dim 384]

Builds two synthetic versions of one index (random unit vectors, as many as --passages), starts a retriever
and a gateway as processes, keeps searching while swapping through the gateway, and reads the retriever's
resident memory (VmRSS) and peak (VmHWM) from /proc. "One version" is the steady memory serving v1 minus the
memory of the same retriever serving a 1-passage index.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.clients import channel, wait_until_serving  # noqa: E402
from rag.v1 import retriever_pb2, retriever_pb2_grpc  # noqa: E402
from rag_cli.admin import AdminConfig, swap  # noqa: E402
from rag_cli.testing.random_models import save_sentence_encoder  # noqa: E402
from rag_cli.up import Child, spawn  # noqa: E402
from retriever_svc.build import build_index  # noqa: E402
from retriever_svc.encoders import Encoder, load_encoder  # noqa: E402
from retriever_svc.layout import EncoderInfo  # noqa: E402


class RandomPassages(Encoder):
    """The identity of a real encoder, with random unit vectors for passages (building is then fast)."""

    def __init__(self, real: Encoder, seed: int) -> None:
        self.info = real.info
        self.rng = np.random.default_rng(seed)

    def question_vectors(self, questions: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError("builds only")

    def save_question_tower(self, out_dir: Path, document_encoder: EncoderInfo) -> None:
        raise NotImplementedError("builds only")

    def question_tower_spec(self, path: Path) -> str:
        raise NotImplementedError("builds only")

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        vectors = self.rng.standard_normal((len(texts), self.info.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def serve(service: str, env: dict[str, str], **flags: object) -> Child:
    """`rag serve SERVICE` as a child process, as `rag up` starts it, once it is SERVING."""
    child = spawn(service, {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **flags}, env)
    if not wait_until_serving(child.learn_address(120), 600):
        raise SystemExit(f"{service} did not become ready")
    return child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rag-swap-bench-"))
    encoder_dir = save_sentence_encoder(work / "encoder", hidden=options.dim)
    real = load_encoder(f"sentence-transformer:{encoder_dir}")
    root = work / "indexes"
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as out:
        for i in range(options.passages):
            out.write(json.dumps({"id": f"p{i}", "title": f"T{i}", "text": f"passage {i}"}) + "\n")
    tiny = work / "tiny.jsonl"
    tiny.write_text(json.dumps({"id": "x", "title": "T", "text": "one passage"}) + "\n")
    started = time.perf_counter()
    for seed in (1, 2):
        build_index(
            corpus, "jsonl", root, "bench", RandomPassages(real, seed), reuse_embeddings=False, show_progress=False
        )
    build_index(tiny, "jsonl", root, "tiny", RandomPassages(real, 0), show_progress=False)
    print(f"built 2 versions x {options.passages} x {options.dim}-d in {time.perf_counter() - started:.0f} s")

    token = secrets.token_urlsafe(16)
    env = dict(os.environ, RAG_ADMIN_TOKEN=token)
    base_process = serve("retriever", env, index_root=root, index="tiny").process
    base = memory_kib(base_process.pid)["VmRSS"]
    base_process.terminate()

    retriever = serve("retriever", env, index_root=root, index="bench@v1")
    gateway = serve("gateway", env, retrievers=retriever.address)
    stub = retriever_pb2_grpc.RetrieverServiceStub(channel(retriever.address))
    search = retriever_pb2.SearchRequest(questions=["what is passage 42?"] * 8, k=10)
    for _ in range(3):  # touch every page of v1
        stub.Search(search, timeout=120)
    steady = memory_kib(retriever.process.pid)["VmRSS"]

    stop = threading.Event()
    searches = [0]

    def keep_searching() -> None:
        while not stop.is_set():
            stub.Search(search, timeout=120)
            searches[0] += 1

    client = threading.Thread(target=keep_searching)
    client.start()
    reply = swap(AdminConfig(gateway=gateway.address, admin_token=token), "v2", "bench")
    time.sleep(2)  # searches on v2 now touch its pages too
    stop.set()
    client.join()
    after = memory_kib(retriever.process.pid)
    for child in (gateway, retriever):
        child.process.terminate()
        child.process.wait()

    one = steady - base
    index_mib = options.passages * options.dim * 4 / 2**20
    print(f"embeddings per version: {index_mib:.0f} MiB; retriever with a 1-passage index: {base / 1024:.0f} MiB")
    print(f"load + validate v2: {reply.load_seconds:.2f} s; activate: {reply.activate_seconds * 1000:.1f} ms; "
          f"{searches[0]} searches served during the swap, none failed")  # fmt: skip
    print(f"one version resident: {one / 1024:.0f} MiB; peak during the swap: {(after['VmHWM'] - base) / 1024:.0f} MiB "
          f"({(after['VmHWM'] - base) / one:.2f}x one version); after: {(after['VmRSS'] - base) / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
