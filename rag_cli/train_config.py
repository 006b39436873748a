"""The options of `rag train`: a light module, so that the command-line parser loads no torch (the training
itself is rag_cli.train)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from generator_svc.config import Device
from rag import paths
from rag.config import option
from rag.types import Mode, RetrievalMode, from_word


class Learns(enum.Enum):
    """What `rag train` trains: the query encoder (the document encoder and index stay fixed), the generator, or
    both, as the paper does."""

    QUERY_ENCODER = "query-encoder"
    GENERATOR = "generator"
    BOTH = "both"

    @property
    def encoder(self) -> bool:
        return self is not Learns.GENERATOR

    @property
    def generator(self) -> bool:
        return self is not Learns.QUERY_ENCODER

    @classmethod
    def parse(cls, text: str) -> Learns:
        return from_word(cls, text, "--train")


MODES = (Mode.TOKEN.value, Mode.SEQUENCE.value)
TRAIN_RETRIEVAL = (RetrievalMode.DENSE.value, RetrievalMode.HYBRID.value)


@dataclass
class TrainConfig:
    index: str = option("", "NAME[@VERSION] of the index to retrieve from (it stays unchanged)", required=True)
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    encoder: str = option("", "query encoder spec; default: the encoder that built the index")
    generator: str = option(paths.demo_generator_spec(), "generator: model directory, RAG checkpoint or .gguf")
    train: str = option("both", f"what learns: {', '.join(w.value for w in Learns)}")
    mode: str = option(
        "sequence",
        "the marginal the loss uses: sequence (RAG-Sequence: one sharp posterior per passage, the stronger signal "
        "for the query encoder) or token (RAG-Token)",
    )
    k: int = option(5, "passages retrieved per question")
    candidates: int = option(
        0,
        "frozen generator: passages per question scored into the likelihood table up front (the top N under the "
        "untrained encoder, N >= k; 0 = 2k); passages that enter a top-k later are scored when they do",
    )
    likelihoods: str = option(
        "",
        "frozen generator: the likelihood table (SQLite) to read and extend; default OUT/likelihoods.sqlite. Reusable "
        "by any run with the same generator, precision and index",
    )
    kv_cache_dir: str = option(
        "",
        "frozen generator: a directory for its passage KV cache's disk tier (at most half the free space), so each "
        "passage runs once for the whole table, its lazy scoring and later runs, however many questions retrieve "
        "it; empty: memory only",
    )
    oracle_reader: bool = option(
        False,
        "diagnostic (--train query-encoder): instead of a generator, log p(y|x,z) = 0 when an answer occurs in the "
        "passage and -10 otherwise; bounds what training the query encoder can gain",
    )
    retrieval: str = option(
        "dense",
        "dense, or hybrid (the linear fusion with BM25, as the retrievers serve it; the gradient reaches the query "
        "encoder through its dense term)",
    )
    epochs: int = option(1, "passes over the questions")
    max_steps: int = option(0, "train this many steps, cycling through the questions (overrides --epochs; 0 = off)")
    lr: float = option(3e-5, "peak learning rate (AdamW, linear warmup and decay)")
    held_out: float = option(
        0.1,
        "fraction of the questions (whole gold passages at a time) kept out of training to measure the marginal NLL "
        "on; the best checkpoint by it is kept, and training stops early when it stops improving (0 = off)",
    )
    eval_every: int = option(0, "steps between held-out evaluations (0 = once per epoch)")
    patience: int = option(3, "held-out evaluations without improvement before training stops early")
    batch_size: int = option(8, "questions per step")
    generator_dtype: str = option(
        "auto",
        "precision of a frozen generator (--train encoder): auto, float32 or bfloat16; one that learns is float32",
    )
    lora_rank: int = option(0, "train the generator as LoRA adapters of this rank, merged at the end (0 = fully)")
    encoder_lora_rank: int = option(
        0,
        "train the query encoder as a LoRA adapter of this rank, saved alone (a few hundred kB) and served as "
        "--encoder sentence-transformer:BASE+ADAPTER (0 = the whole tower)",
    )
    dev: str = option("", "question set to evaluate (rag eval) before and after training")
    out: str = option("", "output directory; default $RAG_HOME/train/<index name>; a rerun resumes there")
    device: str = option("auto", f"{', '.join(d.value for d in Device)} (auto: CUDA when there is one)")
    seed: int = option(0, "seed of the question order and of the initial LoRA weights")
    questions_format: str = option("", "question-set format (jsonl, squad, dpr-qa); default: from the file")
    checkpoint_every: int = option(50, "steps between resumable checkpoints")
    progress: bool = option(True, "show a progress bar")
