"""Shared fixtures: tiny random models saved like real checkpoints, a small corpus and index, and the three
services running in-process on ephemeral loopback ports."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import transformers

from gateway.config import GatewayConfig
from gateway.server import create_server as create_gateway
from generator_svc.config import GeneratorConfig
from generator_svc.server import create_server as create_generator
from rag import random_models
from rag.serving import ServerThread
from rag.v1 import gateway_pb2_grpc, generator_pb2_grpc
from retriever_svc.config import RetrieverConfig
from retriever_svc.encoders import load_encoder
from retriever_svc.index import build_index
from retriever_svc.server import create_server as create_retriever

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


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
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


@pytest.fixture(scope="session")
def index_root(tmp_path_factory: pytest.TempPathFactory, tiny: TinyModels, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("indexes")
    build_index(corpus, "jsonl", root, "tiny", load_encoder(tiny.encoder_spec), show_progress=False)
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


def local(port: int) -> str:
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def services(loop_thread: ServerThread, tiny: TinyModels, index_root: Path) -> Iterator[Services]:
    """Retriever (tiny sentence encoder), generator (tiny RAG/BART checkpoint) and gateway, in-process."""
    common = {"host": "127.0.0.1", "port": 0, "metrics_port": 0}
    retriever = loop_thread.start(create_retriever, RetrieverConfig(**common, index_root=str(index_root), index="tiny"))
    generator = loop_thread.start(create_generator, GeneratorConfig(**common, generator=str(tiny.rag_checkpoint)))
    gateway = loop_thread.start(
        create_gateway,
        GatewayConfig(**common, retrievers=local(retriever.port), generator_address=local(generator.port)),
    )
    yield Services(local(retriever.port), local(generator.port), local(gateway.port))
    for served in (gateway, retriever, generator):
        loop_thread.run(served.stop(0))
