"""Generator settings: each field is a `rag serve generator` flag with an env mirror."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rag import paths
from rag.config import option
from rag.serving import ServerConfig
from rag.types import from_word


class Device(enum.Enum):
    """Where a model runs (auto: CUDA when torch sees one)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @classmethod
    def parse(cls, text: str) -> Device:
        return from_word(cls, text, "device")


@dataclass
class GeneratorConfig(ServerConfig):
    port: int = option(50053, "gRPC port (0 picks a free one)")
    generator: str = option(paths.demo_generator_spec(), "model directory, facebook/rag-* checkpoint or .gguf file")
    max_new_tokens: int = option(32, "max_new_tokens when a request leaves it unset")
    score_temperature: float = option(1.0, "temperature of p(z|x) when a request leaves it unset (1 = transformers)")
    max_question_tokens: int = option(512, "questions longer than this, in the model's tokens, get INVALID_ARGUMENT")
    max_prompt_tokens: int = option(
        16384, "a request's prompts (every passage's, in the model's tokens) beyond this get INVALID_ARGUMENT"
    )
    chunk_tokens: int = option(
        0, "tokens per model pass of prompt and scoring work, the caller checked between passes; 0 = by device"
    )
    kv_cache_mb: int = option(
        -1,
        "passage KV cache of a decoder-only generator, MiB (segments reused across requests, exactly); 0 turns it "
        "off, -1 sizes it from the machine (a tenth of its memory, at most 4 GiB)",
    )
    kv_cache_dir: str = option(
        "",
        "a directory for the passage KV cache's disk tier (empty: memory only): segments written there are read "
        "back after a restart, by replicas sharing the volume, and beyond the memory budget",
    )
    kv_cache_disk_mb: int = option(
        -1, "the disk tier's budget, MiB; -1: half the space free on its filesystem when the generator starts"
    )
    draft_tokens: int = option(
        -1,
        "tokens drafted from the passages and question that greedy search verifies per pass (0: none); -1 measures "
        "in the warm-up which count answers fastest on this machine (none where a pass over more positions costs "
        "much more, as on a CPU computing at its limit)",
    )
    warm_up: bool = option(True, "run both RAG modes once on 5 passages before reporting SERVING (a fast first Ask)")
    max_queue: int = option(16, "requests waiting for the model before new ones get RESOURCE_EXHAUSTED")
    max_batch: int = option(
        8, "requests decoded together at most: in flight at once (decoder-only) or in one batch (1 = none)"
    )
    threads: int = option(0, "torch threads for the model; 0 = the container's CPU limit, else one per core")
    dtype: str = option(
        "auto",
        "weights precision: auto (bfloat16 where the GPU or CPU computes in it natively and it keeps the quality "
        "rule, else float32), float32 (the reference), bfloat16, or int8 (a CPU's dynamic quantisation)",
    )
    device: str = option("auto", "where the model runs: auto (CUDA when torch sees one), cpu or cuda")
