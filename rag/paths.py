"""Where the project keeps what it fetches and builds: $RAG_HOME (default ~/.cache/rag)."""

from __future__ import annotations

import os
from pathlib import Path


def rag_home() -> Path:
    if os.environ.get("RAG_HOME"):
        return Path(os.environ["RAG_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag"


def index_root() -> Path:
    return rag_home() / "indexes"


def models_dir() -> Path:
    return rag_home() / "models"


DEMO_INDEX = "wiki"
DEMO_ENCODER_DIR = "all-MiniLM-L6-v2"
DEMO_GENERATOR_DIR = "Qwen2.5-Coder-0.5B-Instruct"


def demo_encoder_spec() -> str:
    return f"sentence-transformer:{models_dir() / DEMO_ENCODER_DIR}"


def demo_generator_spec() -> str:
    return str(models_dir() / DEMO_GENERATOR_DIR)
