"""The options of `rag train`: a light module, so that the command-line parser loads no torch (the training
itself is rag_cli.train)."""

from __future__ import annotations

from dataclasses import dataclass

from generator_svc.config import Device
from rag import paths
from rag.config import option
from rag.types import Mode, RetrievalMode

WHAT = ("query-encoder", "generator", "both")
MODES = (Mode.TOKEN.value, Mode.SEQUENCE.value)
TRAIN_RETRIEVAL = (RetrievalMode.DENSE.value, RetrievalMode.HYBRID.value)


@dataclass
class TrainConfig:
    index: str = option("", "NAME[@VERSION] of the index to retrieve from (it stays unchanged)", required=True)
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    encoder: str = option("", "query encoder spec; default: the encoder that built the index")
    generator: str = option(paths.demo_generator_spec(), "generator: model directory, RAG checkpoint or .gguf")
    train: str = option("both", f"what learns: {', '.join(WHAT)}")
    mode: str = option("token", "the marginal the loss uses: token (RAG-Token) or sequence (RAG-Sequence)")
    k: int = option(5, "passages retrieved per question")
    retrieval: str = option(
        "dense",
        "dense, or hybrid (the linear fusion with BM25, as the retrievers serve it; the gradient reaches the query "
        "encoder through its dense term)",
    )
    epochs: int = option(1, "passes over the questions")
    max_steps: int = option(0, "train this many steps, cycling through the questions (overrides --epochs; 0 = off)")
    lr: float = option(3e-5, "peak learning rate (AdamW, linear warmup and decay)")
    batch_size: int = option(8, "questions per step")
    generator_dtype: str = option(
        "auto",
        "precision of a frozen generator (--train encoder): auto, float32 or bfloat16; one that learns is float32",
    )
    lora_rank: int = option(0, "train the generator as LoRA adapters of this rank, merged at the end (0 = fully)")
    dev: str = option("", "question set to evaluate (rag eval) before and after training")
    out: str = option("", "output directory; default $RAG_HOME/train/<index name>; a rerun resumes there")
    device: str = option("auto", f"{', '.join(d.value for d in Device)} (auto: CUDA when there is one)")
    seed: int = option(0, "seed of the question order and of the initial LoRA weights")
    questions_format: str = option("", "question-set format (jsonl, squad, dpr-qa); default: from the file")
    checkpoint_every: int = option(50, "steps between resumable checkpoints")
    progress: bool = option(True, "show a progress bar")
