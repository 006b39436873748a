"""Shared fixtures: tiny random models saved like real checkpoints, a small corpus and index, and the three
services running in-process on ephemeral loopback ports."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import transformers

from rag.serving import ServerThread
from rag.v1 import gateway_pb2_grpc, generator_pb2_grpc
from rag_cli.testing import random_models
from rag_cli.testing.stack import Launcher
from retriever_svc.build import build_index
from retriever_svc.encoders import load_encoder
from retriever_svc.layout import Manifest

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
logging.getLogger("faiss").setLevel(logging.WARNING)

FACTS = [
    {
        "id": "fleming",
        "title": "Alexander Fleming",
        "text": "Alexander Fleming was a Scottish physician who discovered penicillin in 1928.",
    },
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and most populous city of France."},
    {"id": "everest", "title": "Mount Everest", "text": "Mount Everest is Earth's highest mountain above sea level."},
]


def corpus_records(n_filler: int = 40) -> list[dict[str, str]]:
    filler = [
        {
            "id": f"doc{i}",
            "title": f"Topic {i}",
            "text": " ".join(f"Topic {i} is described in sentence {j}." for j in range(1 + i % 30)),
        }
        for i in range(n_filler)
    ]
    return FACTS + filler


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass(frozen=True)
class TinyModels:
    rag_checkpoint: Path
    sentence_encoder: Path
    causal_lm: Path
    dpr_question: Path
    dpr_context: Path

    @property
    def encoder_spec(self) -> str:
        return f"sentence-transformer:{self.sentence_encoder}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    random_models.save_rag_checkpoint(root / "rag", n_docs=4)
    question, context = random_models.save_dpr_encoders(root / "dpr")
    return TinyModels(
        rag_checkpoint=root / "rag",
        sentence_encoder=random_models.save_sentence_encoder(root / "st"),
        causal_lm=random_models.save_causal_lm(root / "lm"),
        dpr_question=question,
        dpr_context=context,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_records())


RAG = [sys.executable, "-m", "rag_cli"]  # the `rag` command, as a user runs it


def rag(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAG, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def index_build_args(corpus: Path, root: Path, name: str, encoder_spec: str, *extra: str) -> list[str]:
    """`rag index build` as the tests run it (no progress bar unless `extra` asks for one)."""
    return ["index", "build", "--corpus", str(corpus), "--index-root", str(root), "--name", name,
            "--encoder", encoder_spec, *(extra or ("--no-progress",))]  # fmt: skip


def build(corpus: Path, root: Path, name: str, encoder_spec: str, **options: Any) -> Manifest:
    """A new version of index `name` built in-process (the library call behind `rag index build`)."""
    return build_index(corpus, "jsonl", root, name, load_encoder(encoder_spec), show_progress=False, **options)


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModels, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("indexes")
    build(corpus, root, "tiny", tiny.encoder_spec)
    return root


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@dataclass
class Services:
    retriever: str
    generator: str
    gateway: str

    def channel(self, address: str) -> grpc.Channel:
        return grpc.insecure_channel(address)

    def generator_stub(self) -> generator_pb2_grpc.GeneratorServiceStub:
        return generator_pb2_grpc.GeneratorServiceStub(self.channel(self.generator))

    def gateway_stub(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channel(self.gateway))


def passage_ids(shard_dir: Path) -> list[str]:
    """The passage ids a built index shard stores, in row order."""
    with sqlite3.connect(shard_dir / "passages.sqlite") as db:
        return [row[0] for row in db.execute("SELECT id FROM passages ORDER BY row")]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll until `condition` holds (an event seen from outside: a metric, a status); fail saying `what` did not."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def details(err: grpc.RpcError) -> str:
    """An error's message (grpc types it as optional)."""
    return err.details() or ""


@pytest.fixture()
def launch(loop_thread: ServerThread) -> Iterator[Launcher]:
    """Start services for one test (`launch.retriever(...)`, `launch.stack(...)`); all stop after it."""
    launcher = Launcher(loop_thread)
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def services(loop_thread: ServerThread, tiny: TinyModels, index_root: Path) -> Iterator[Services]:
    """Retriever (tiny sentence encoder), generator (tiny RAG/BART checkpoint) and gateway, in-process."""
    launcher = Launcher(loop_thread)
    stack = launcher.stack(index_root, "tiny", tiny.rag_checkpoint)
    yield Services(stack.retriever_addresses[0], stack.generator_address, stack.gateway_address)
    launcher.close()
