"""Dense encoders for questions and passages.

Two kinds, named by an encoder spec:
- `sentence-transformer:PATH` one encoder for both sides, mean pooling, L2-normalised (all-MiniLM-L6-v2);
  scores are cosines in [-1, 1], so p(z|x) needs a low temperature (default 0.05) to be peaked;
- `dpr:question=PATH,context=PATH` DPR's two towers, CLS pooler output, unnormalised inner products
  (temperature 1, as transformers' RAG). `dpr:PATH` with a `facebook/rag-*` checkpoint takes its question
  encoder (enough to serve questions; building an index needs the context encoder too).

An encoder's identity is a hash of its files: an index records it, and a retriever refuses to serve an index
built by another encoder (the vectors would be meaningless).

A fine-tuned query encoder (`rag train`) is a question tower only: its directory holds `question_tower.json`,
the identity of the document encoder it was trained against. It serves every index that document encoder
built, the index unchanged (asymmetric pair: for a sentence-transformer, the fine-tuned copy encodes questions
and the original keeps encoding documents), and builds none. It is a whole model, or a LoRA adapter of a few
hundred kB over the base encoder (`rag train --encoder-lora-rank R`), named `sentence-transformer:BASE+ADAPTER`:
the base keeps encoding documents and a copy with the adapter merged encodes questions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoModel,
    AutoTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rag.errors import FailedPrecondition, InvalidArgument
from rag.files import content_identity
from retriever_svc.layout import EncoderInfo

BATCH_SIZE = 64


QUESTION_TOWER = "question_tower.json"


class Encoder(ABC):
    info: EncoderInfo
    question_model: PreTrainedModel  # the tower that encodes questions: what fine-tuning changes

    @abstractmethod
    def question_vectors(self, questions: Sequence[str]) -> torch.Tensor:
        """[len(questions), dim] float32 on the question tower's device; gradients flow when enabled."""

    @torch.inference_mode()
    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        """[len(questions), dim] float32."""
        return self.question_vectors(questions).float().cpu().numpy()

    @abstractmethod
    def encode_passages(self, titles: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32."""

    @abstractmethod
    def save_question_tower(self, out_dir: Path, document_encoder: EncoderInfo) -> None:
        """Save the question tower (as fine-tuned) into `out_dir`, recording the document encoder it pairs with."""

    @abstractmethod
    def question_tower_spec(self, path: Path) -> str:
        """The encoder spec that loads a question tower saved at `path`."""

    def encode_passages_sorted(
        self, titles: Sequence[str], texts: Sequence[str], progress: tqdm | None = None
    ) -> np.ndarray:
        """Encode in batches of similar length (little padding), returning rows in the input order."""
        order = np.argsort([len(t) + len(x) for t, x in zip(titles, texts, strict=True)], kind="stable")
        out = np.empty((len(texts), self.info.dim), dtype=np.float32)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            out[batch] = self.encode_passages([titles[i] for i in batch], [texts[i] for i in batch])
            if progress is not None:
                progress.update(len(batch))
        return out


def _max_length(path: Path, default: int = 256) -> int:
    config = path / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_seq_length", default))
    return default


def _write_question_tower(out_dir: Path, document_encoder: EncoderInfo) -> None:
    (out_dir / QUESTION_TOWER).write_text(json.dumps({"document_encoder": document_encoder.to_json()}, indent=2))


def _paired_document_encoder(path: Path) -> EncoderInfo | None:
    """The document encoder a fine-tuned question tower was trained against (None: not a fine-tuned tower)."""
    marker = path / QUESTION_TOWER
    return EncoderInfo.from_json(json.loads(marker.read_text())["document_encoder"]) if marker.exists() else None


class SentenceTransformerEncoder(Encoder):
    def __init__(self, path: Path, spec: str, score_temperature: float = 0.05, adapter: Path | None = None) -> None:
        self.path = path
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True, dtype=torch.float32).eval()
        self.question_model = self.model  # one model for both sides, until a fine-tuned copy takes the questions
        self.max_length = _max_length(path)
        identity = content_identity(path)
        self.document_encoder = _paired_document_encoder(path)
        if adapter is not None:  # the questions' copy, adapted; the base model stays the documents' encoder
            self.question_model = _adapted(self.model, adapter)
            identity = hashlib.sha256(f"{identity}+{content_identity(adapter)}".encode()).hexdigest()
            self.document_encoder = _paired_document_encoder(adapter)
        paired = self.document_encoder
        self.info = EncoderInfo(
            "sentence-transformer",
            spec,
            identity,
            paired.passage_identity if paired else identity,
            self.model.config.hidden_size,
            paired.score_temperature if paired else score_temperature,
        )

    def _embed(self, texts: Sequence[str], model: torch.nn.Module) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(next(model.parameters()).device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def question_vectors(self, questions: Sequence[str]) -> torch.Tensor:
        return self._embed(questions, self.question_model)

    @torch.inference_mode()
    def encode_passages(self, titles: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        if self.document_encoder is not None:
            raise FailedPrecondition(
                f"{self.info.spec} is a fine-tuned question tower; encode passages (build indexes) with its "
                f"document encoder {self.document_encoder.spec}"
            )
        titled = [f"{t}: {x}" if t else x for t, x in zip(titles, texts, strict=True)]
        return self._embed(titled, self.model).cpu().numpy()

    def save_question_tower(self, out_dir: Path, document_encoder: EncoderInfo) -> None:
        if _is_adapter(self.question_model):  # the adapter alone (rag train --encoder-lora-rank)
            self.question_model.save_pretrained(out_dir, safe_serialization=True)
        else:
            shutil.copytree(self.path, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", QUESTION_TOWER))
            self.question_model.save_pretrained(out_dir, safe_serialization=True)
        _write_question_tower(out_dir, document_encoder)

    def question_tower_spec(self, path: Path) -> str:
        if _is_adapter(self.question_model):
            return f"sentence-transformer:{self.path}+{path}"
        return f"sentence-transformer:{path}"


def with_question_adapter(encoder: Encoder, rank: int) -> None:
    """Make the encoder's question tower a LoRA adapter of rank `rank` over a copy of its model (training): only
    the adapter learns, and `save_question_tower` writes only it."""
    import peft

    if not isinstance(encoder, SentenceTransformerEncoder):
        raise InvalidArgument("a LoRA query encoder (--encoder-lora-rank) needs a sentence-transformer encoder")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    # A PeftModel stands in for the model it wraps (forward, save_pretrained, parameters).
    encoder.question_model = cast(PreTrainedModel, peft.get_peft_model(copy.deepcopy(encoder.model), config))


def _is_adapter(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _adapted(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """A copy of `model` with the LoRA adapter in `adapter` merged into its weights."""
    import peft

    if not (adapter / "adapter_config.json").exists():
        raise FailedPrecondition(f"encoder adapter {str(adapter)!r} not found (no adapter_config.json there)")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload()
    return merged.eval()


class DPREncoder(Encoder):
    """DPR: questions and passages through separate BERT towers; passages encoded as (title, text) pairs."""

    def __init__(self, question: Path, context: Path | None, spec: str, score_temperature: float = 1.0) -> None:
        self.question_tokenizer, self.question_model = _load_dpr_tower(question, DPRQuestionEncoder)
        self.context_tokenizer: PreTrainedTokenizerBase | None = None
        self.context_model: PreTrainedModel | None = None
        if context:
            self.context_tokenizer, self.context_model = _load_dpr_tower(context, DPRContextEncoder)
        paired = _paired_document_encoder(question)
        self.info = EncoderInfo(
            "dpr",
            spec,
            content_identity(question),
            paired.passage_identity if paired else (content_identity(context) if context else ""),
            self.question_model.config.projection_dim or self.question_model.config.hidden_size,
            paired.score_temperature if paired else score_temperature,
        )

    def question_vectors(self, questions: Sequence[str]) -> torch.Tensor:
        batch = self.question_tokenizer(
            list(questions), padding=True, truncation=True, max_length=256, return_tensors="pt"
        ).to(self.question_model.device)
        return self.question_model(**batch).pooler_output.float()

    @torch.inference_mode()
    def encode_passages(self, titles: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        if self.context_model is None or self.context_tokenizer is None:
            raise FailedPrecondition("this DPR encoder has no context encoder; use dpr:question=PATH,context=PATH")
        batch = self.context_tokenizer(
            list(titles), list(texts), padding=True, truncation="only_second", max_length=256, return_tensors="pt"
        )
        return self.context_model(**batch).pooler_output.float().numpy()

    def save_question_tower(self, out_dir: Path, document_encoder: EncoderInfo) -> None:
        self.question_model.save_pretrained(out_dir, safe_serialization=True)
        self.question_tokenizer.save_pretrained(out_dir)
        _write_question_tower(out_dir, document_encoder)

    def question_tower_spec(self, path: Path) -> str:
        return f"dpr:question={path}"


def _load_dpr_tower(
    path: Path, cls: type[DPRQuestionEncoder] | type[DPRContextEncoder]
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "rag":  # a RAG checkpoint: its question encoder and question tokenizer
        from transformers import RagTokenForGeneration

        rag = RagTokenForGeneration.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
        return AutoTokenizer.from_pretrained(path / "question_encoder_tokenizer"), rag.rag.question_encoder.eval()
    model = cls.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(path), model.eval()


def load_encoder(spec: str) -> Encoder:
    kind, _, rest = spec.partition(":")
    if not rest:
        raise InvalidArgument(
            f"encoder spec {spec!r} needs a kind: sentence-transformer:PATH[+ADAPTER] or dpr:question=PATH,context=PATH"
        )
    if kind == "sentence-transformer":
        base, plus, adapter = rest.partition("+")
        if plus:
            return SentenceTransformerEncoder(_existing(base), spec, adapter=Path(adapter).expanduser().resolve())
        return SentenceTransformerEncoder(_existing(rest), spec)
    if kind == "dpr":
        parts = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
        question = _existing(parts.get("question", rest if "=" not in rest else ""))
        context = _existing(parts["context"]) if "context" in parts else None
        return DPREncoder(question, context, spec)
    raise InvalidArgument(f"unknown encoder kind {kind!r}; use sentence-transformer or dpr")


def _existing(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not (path / "config.json").exists():
        raise FailedPrecondition(f"encoder model {path_text!r} not found (no config.json there)")
    return path.resolve()
