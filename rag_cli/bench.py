"""`rag bench`: speed against references, each figure a ratio measured in one run on this machine.

    rag bench [--quick] [--only generator,retrieval,gateway,concurrency,build] [--json]

- generator: RAG-Token greedy and beam-4, RAG-Sequence thorough (beam 1 and 4) and fast, against transformers'
  RagTokenForGeneration / RagSequenceForGeneration on the same bart-base-shaped model (random weights) and the
  same passages; identical tokens are asserted before timing (fast decoding has no reference: it is timed
  against transformers' thorough);
- retrieval: exact search of 1 and 64 queries over 1M x 384-d vectors against faiss IndexFlatIP and against the
  memory-bandwidth floor (bytes scanned / measured copy bandwidth); HNSW recall@10 and queries/s;
- gateway: Ask end to end against calling the same retriever and generator code in-process (p50);
- concurrency: queries/s with 8 concurrent clients against 1 (the generator batches concurrent requests);
- build: `rag index build` passages/s against the encoder's forward pass alone.
`--quick` shrinks every size (seconds instead of minutes) so CI can run it; its ratios say little.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rag.config import option
from rag.types import DecodingOptions

if TYPE_CHECKING:  # the services load torch: `rag bench` imports them only in the sections that run them
    from rag_cli.testing.random_models import BartShape
    from rag_cli.testing.stack import Launcher, Stack

SECTIONS = ("generator", "retrieval", "gateway", "concurrency", "build")


@dataclass
class BenchConfig:
    quick: bool = option(False, "small sizes: seconds, for CI (ratios then say little)")
    only: str = option("", f"comma-separated sections: {', '.join(SECTIONS)}")
    repeats: int = option(3, "timed repetitions per figure (the median is reported)")
    json: bool = option(False, "end with one JSON line holding every figure")


@dataclass
class Figure:
    section: str
    name: str
    ours_s: float
    reference_s: float
    reference: str
    goal: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """How many times faster than the reference (reference time / our time)."""
        return self.reference_s / self.ours_s if self.ours_s else float("inf")


def median_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm up (allocations, caches, lazy imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ generator


def bench_generator(config: BenchConfig, work: Path) -> list[Figure]:
    import torch
    from transformers import AutoTokenizer, RagSequenceForGeneration, RagTokenForGeneration

    from generator_svc import rag_math
    from generator_svc.families import load_passage_lm
    from generator_svc.passage_lm import one_each
    from rag.types import Mode, Passage, SequenceDecoding
    from rag_cli.testing import random_models
    from rag_cli.testing.hf_reference import generated_tokens, mask_rag_sequence_padding

    checkpoint = work / "bart-base-rag"
    # init_std 0.05 rather than BART's 0.02: with 0.02 random weights end every answer at once, and only the
    # fixed costs would be timed; with 0.05 answers run to max_new_tokens, like real multi-token answers.
    shape = _bart_shape(config.quick)
    random_models.save_rag_checkpoint(checkpoint, shape=shape, n_docs=5, init_std=0.05, vocab_size=50265)
    lm = load_passage_lm(str(checkpoint))
    hf_token = RagTokenForGeneration.from_pretrained(checkpoint).eval()
    hf_sequence = RagSequenceForGeneration.from_pretrained(checkpoint).eval()
    mask_rag_sequence_padding(hf_sequence)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "generator_tokenizer")
    question = "who discovered penicillin and in which year did he discover it?"
    words = "penicillin was discovered by alexander fleming in 1928 at st mary's hospital in london . " * 30
    passages = [Passage(f"p{k}", f"Passage {k}", words[k * 7 :], score=float(5 - k)) for k in range(5)]
    texts = [f"{p.title} / {p.text} // {question}".replace("  ", " ") for p in passages]
    batch = tokenizer(texts, max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    scores = torch.tensor([[p.score for p in passages]])
    context = dict(
        context_input_ids=batch["input_ids"],
        context_attention_mask=batch["attention_mask"],
        doc_scores=scores,
        n_docs=5,
    )
    new_tokens = 20

    def ours(options: DecodingOptions) -> list[tuple[int, ...]]:
        ctx = lm.encode([question], [one_each(passages)])
        return [g.tokens for g in rag_math.generate(lm, ctx, rag_math.log_prior(scores), options)[0]]

    def theirs(mode: Mode, beams: int) -> list[tuple[int, ...]]:
        with torch.no_grad():
            if mode is Mode.TOKEN:
                rows = hf_token.generate(**context, num_beams=beams, num_return_sequences=1, max_length=new_tokens + 1)
            else:
                rows = hf_sequence.generate(
                    **context, num_beams=beams, num_return_sequences=1, max_new_tokens=new_tokens
                )
        return generated_tokens(rows, hf_token.config.generator.pad_token_id)

    figures = []
    thorough, fast = SequenceDecoding.THOROUGH, SequenceDecoding.FAST
    cases = [
        ("RAG-Token greedy", Mode.TOKEN, thorough, 1, "1.5x"),
        ("RAG-Token beam 4", Mode.TOKEN, thorough, 4, "1.5x"),
        ("RAG-Sequence thorough, beam 1", Mode.SEQUENCE, thorough, 1, "3x"),
        ("RAG-Sequence thorough, beam 4", Mode.SEQUENCE, thorough, 4, "3x"),
        ("RAG-Sequence fast, beam 4", Mode.SEQUENCE, fast, 4, ""),
    ]
    for name, mode, decoding, beams, goal in cases:
        options = DecodingOptions(mode=mode, sequence_decoding=decoding, num_beams=beams, max_new_tokens=new_tokens)
        if options.thorough:
            assert ours(options) == theirs(mode, beams), f"{name}: tokens differ from transformers"
        ours_s = median_time(lambda: ours(options), config.repeats)
        theirs_s = median_time(lambda: theirs(mode, beams), config.repeats)
        reference = "transformers " + (
            "RagTokenForGeneration" if mode is Mode.TOKEN else "RagSequenceForGeneration (thorough)"
        )
        figure = Figure("generator", name, ours_s, theirs_s, reference, goal)
        if goal:
            figure.met = figure.ratio >= float(goal.rstrip("x"))
        else:
            figure.note = "no reference for fast decoding: compared with thorough"
        figures.append(figure)
    return figures


# ------------------------------------------------------------------------------------------------ retrieval


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second memcpy moves (each byte counted once)."""
    source = np.ones(nbytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    return nbytes / median_time(lambda: np.copyto(target, source), 3)


def embedding_like(rng: np.random.Generator, n: int, dim: int, intrinsic: int = 24) -> np.ndarray:
    """Unit vectors shaped like sentence embeddings: near a low-dimensional subspace, not uniform on the sphere.
    Uniform points in 384-d have no near neighbours (every pair is almost orthogonal), which makes any
    approximate index look broken; real embedding sets have a low intrinsic dimension."""
    lift = rng.standard_normal((intrinsic, dim), dtype=np.float32)
    vectors = rng.standard_normal((n, intrinsic), dtype=np.float32) @ lift
    vectors += 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def bench_retrieval(config: BenchConfig, work: Path) -> list[Figure]:
    import faiss

    from retriever_svc.search import exact_top_k

    n, dim = (50_000, 384) if config.quick else (1_000_000, 384)
    rng = np.random.default_rng(0)
    vectors = embedding_like(rng, n + 164, dim)
    vectors, queries_pool = vectors[:n], vectors[n:]  # queries: fresh draws from the same distribution
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    floor = vectors.nbytes / copy_bandwidth()
    figures = []
    for count in (1, 64):
        queries = queries_pool[:count]
        ours_ids = [[h.row for h in hits] for hits in exact_top_k(vectors, queries, 10)]
        assert ours_ids == flat.search(queries, 10)[1].tolist(), "exact search differs from faiss IndexFlatIP"
        ours_s = median_time(lambda: exact_top_k(vectors, queries, 10), config.repeats)
        faiss_s = median_time(lambda: flat.search(queries, 10), config.repeats)
        label = f"exact top-10, {count} quer{'y' if count == 1 else 'ies'}, {n:,} x {dim}"
        figures.append(Figure("retrieval", label, ours_s, faiss_s, "faiss IndexFlatIP"))
        figures.append(
            Figure(
                "retrieval",
                label,
                ours_s,
                floor,
                "memory-bandwidth floor",
                "<= 1.5x the floor",
                ours_s <= 1.5 * floor,
                note=f"{ours_s / floor:.2f}x the floor (ratio = floor / ours)",
            )  # fmt: skip
        )
    # HNSW against exact.
    m = min(n, 20_000 if config.quick else 200_000)
    hnsw = faiss.index_factory(dim, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    hnsw.add(vectors[:m])
    faiss.ParameterSpace().set_index_parameter(hnsw, "efSearch", 128)
    queries = queries_pool[64:]
    exact = [{h.row for h in hits} for hits in exact_top_k(vectors[:m], queries, 10)]
    found = hnsw.search(queries, 10)[1]
    recall = sum(len(e & set(f.tolist())) for e, f in zip(exact, found, strict=True)) / (10 * len(queries))
    hnsw_s = median_time(lambda: [hnsw.search(q[None], 10) for q in queries], config.repeats) / len(queries)
    exact_s = median_time(lambda: [exact_top_k(vectors[:m], q[None], 10) for q in queries[:20]], config.repeats) / 20
    figures.append(
        Figure(
            "retrieval",
            f"HNSW32 (efSearch 128) one query, {m:,} x {dim}",
            hnsw_s,
            exact_s,
            "exact search",
            note=f"recall@10 {recall:.3f}; {1 / hnsw_s:,.0f} queries/s",
        )  # fmt: skip
    )
    return figures


# ------------------------------------------------------------------------------------------------ services


def _bart_shape(quick: bool) -> BartShape:
    """bart-base (a tiny model with --quick)."""
    from rag_cli.testing.random_models import BART_BASE, BartShape

    return BartShape(d_model=64, layers=2, heads=4, ffn=128) if quick else BART_BASE


def _services(work: Path, quick: bool) -> tuple[Launcher, Stack]:
    """Tiny encoder + a small index, the bart-base-shaped generator, and the gateway, in-process."""
    from rag_cli.testing import random_models
    from rag_cli.testing.stack import Launcher
    from retriever_svc.build import build_index
    from retriever_svc.encoders import load_encoder

    encoder = random_models.save_sentence_encoder(work / "encoder")
    corpus = work / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": f"document {i} about topic {i % 50} " * 20}) + "\n"
            for i in range(2000)
        )
    )
    build_index(
        corpus, "jsonl", work / "indexes", "bench", load_encoder(f"sentence-transformer:{encoder}"), show_progress=False
    )
    checkpoint = work / "bart-base-rag"
    if not (checkpoint / "config.json").exists():
        random_models.save_rag_checkpoint(
            checkpoint, n_docs=5, init_std=0.05, vocab_size=50265, shape=_bart_shape(quick)
        )
    launcher = Launcher()
    return launcher, launcher.stack(work / "indexes", "bench", checkpoint, max_batch=8, max_queue=64)


def bench_gateway(config: BenchConfig, work: Path) -> list[Figure]:
    import grpc

    from generator_svc.requests import Request
    from rag.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2

    launcher, services = _services(work, config.quick)
    try:
        question = "what is document 42 about?"
        options = generator_pb2.DecodingOptions(max_new_tokens=12)
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(services.gateway_address))
        ask = lambda: stub.Ask(gateway_pb2.AskRequest(question=question, k=5, options=options), timeout=120)  # noqa: E731
        # The same work in-process: the retriever's and the generator's own code, no gRPC in between.
        retriever = services.retrievers[0].servicers[0].retriever
        model = services.generator.servicers[0].worker.model
        direct_options = DecodingOptions(max_new_tokens=12, score_temperature=0.05)

        def direct() -> None:
            found = retriever.search([question], 5, False)
            model.generate([Request(question, found.passages[0], direct_options)])

        repeats = max(config.repeats, 5)
        ask_s, direct_s = median_time(ask, repeats), median_time(direct, repeats)
        overhead = ask_s / direct_s - 1
        return [Figure("gateway", "Ask end to end, p50", ask_s, direct_s, "retriever + generator code in-process",
                       "overhead <= 5%", overhead <= 0.05, note=f"overhead {overhead:+.1%}")]  # fmt: skip
    finally:
        launcher.close()


def bench_concurrency(config: BenchConfig, work: Path) -> list[Figure]:
    import grpc

    from rag.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2

    launcher, services = _services(work, config.quick)
    try:
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(services.gateway_address))
        options = generator_pb2.DecodingOptions(max_new_tokens=12)
        total = 16 if config.quick else 32

        def run(clients: int) -> float:
            def one(i: int) -> None:
                stub.Ask(
                    gateway_pb2.AskRequest(question=f"what is document {i} about?", k=5, options=options), timeout=600
                )

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(total)))
            return (time.perf_counter() - start) / total  # seconds per request

        run(2)  # warm up
        single, eight = run(1), run(8)
        return [Figure("concurrency", "queries/s, 8 concurrent clients vs 1", eight, single, "1 client",
                       ">= 2x", single / eight >= 2, note=f"1 client {1 / single:.2f}, 8 clients {1 / eight:.2f} queries/s")]  # fmt: skip
    finally:
        launcher.close()


def bench_build(config: BenchConfig, work: Path) -> list[Figure]:
    from rag import paths
    from rag_cli.testing.random_models import save_sentence_encoder
    from retriever_svc.build import build_index
    from retriever_svc.encoders import load_encoder

    minilm = paths.models_dir() / paths.DEMO_ENCODER_DIR
    if config.quick or not (minilm / "model.safetensors").exists():
        spec, label = (
            f"sentence-transformer:{save_sentence_encoder(work / 'build-encoder', hidden=64)}",
            "a random 64-d BERT",
        )
    else:
        spec, label = f"sentence-transformer:{minilm}", "all-MiniLM-L6-v2"
    encoder = load_encoder(spec)
    count = 400 if config.quick else 3000
    rng = np.random.default_rng(0)
    vocabulary = [f"word{i}" for i in range(5000)]
    records = [
        {"id": f"d{i}", "title": f"Title {i}", "text": " ".join(rng.choice(vocabulary, int(rng.integers(20, 100))))}
        for i in range(count)
    ]
    corpus = work / "build.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    titles, texts = [r["title"] for r in records], [r["text"] for r in records]
    raw_s = median_time(lambda: encoder.encode_passages_sorted(titles, texts), 1)
    root = work / "build-indexes"
    build_s = median_time(
        lambda: build_index(corpus, "jsonl", root, "b", encoder, reuse_embeddings=False, show_progress=False), 1
    )
    overhead = build_s / raw_s - 1
    return [Figure("build", f"index build, {count} passages, {label}", build_s, raw_s, "encoder forward pass alone",
                   "overhead <= 10%", overhead <= 0.10, note=f"{count / build_s:.0f} passages/s; overhead {overhead:+.1%}")]  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def run_bench(config: BenchConfig) -> list[Figure]:
    sections = [s.strip() for s in config.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        from rag.errors import InvalidArgument

        raise InvalidArgument(f"unknown bench sections {sorted(unknown)}; use {', '.join(SECTIONS)}")
    runners = {"generator": bench_generator, "retrieval": bench_retrieval, "gateway": bench_gateway,
               "concurrency": bench_concurrency, "build": bench_build}  # fmt: skip
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        for section in sections:
            figures += runners[section](config, Path(tmp))
            print(markdown(figures[-1:]).splitlines()[-1], flush=True)
    return figures


def markdown(figures: list[Figure]) -> str:
    lines = [
        "| section | figure | ours (s) | reference | reference (s) | speed-up | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "no")
        note = f" ({f.note})" if f.note else ""
        lines.append(
            f"| {f.section} | {f.name}{note} | {f.ours_s:.4f} | {f.reference} | {f.reference_s:.4f} | {f.ratio:.2f}x | {f.goal} | {met} |"
        )
    return "\n".join(lines)


def figures_as_json(figures: list[Figure]) -> str:
    return json.dumps([dict(f.__dict__, ratio=f.ratio) for f in figures])
