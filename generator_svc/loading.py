"""Loading a generator from a local path: a RAG checkpoint, a BART/T5 or causal-LM directory, or a GGUF file,
on its device and in its precision; and saving one (fine-tuned) in the layout it came from."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from generator_svc.config import Device
from generator_svc.families import DecoderOnlyLM, EncoderDecoderLM
from generator_svc.passage_cache import DiskTier, PassageKVCache
from generator_svc.passage_lm import PassageLM
from generator_svc.precision import Dtype, choose_precision, packed_products, with_precision
from rag.errors import FailedPrecondition
from rag.files import content_identity

log = logging.getLogger(__name__)


def load_passage_lm(
    spec: str,
    dtype: Dtype = Dtype.FLOAT32,
    device: Device = Device.CPU,
    chunk_tokens: int = 0,
    kv_cache_bytes: int = 0,
    kv_cache_dir: Path | None = None,
    kv_cache_disk_bytes: int = 0,
    packed: bool = True,
) -> PassageLM:
    """Load a generator from a local path: a RAG checkpoint (`facebook/rag-*` layout), a BART/T5 or causal-LM
    directory (safetensors), or a `.gguf` file, with its weights in `dtype` (see `choose_precision`) on `device` (auto: CUDA when torch sees one), running prompts and scoring in passes of
    `chunk_tokens` (0: by device), a decoder-only LM with a passage KV cache of `kv_cache_bytes` (0: none), over
    a disk tier of `kv_cache_disk_bytes` in `kv_cache_dir` where one is given. On a CPU in float32 or bfloat16
    the weights are `packed` for serving (PackedLinear); a generator that learns, or whose weights are read back,
    is loaded with packed=False. Only safetensors/GGUF weights are read; no remote code runs."""
    where = resolve_device(device)
    precision = choose_precision(dtype, where)
    lm = _load(spec)
    lm.model = with_precision(torch.nn.Module.to(lm.model, where), precision.dtype)
    lm.chunk_tokens = chunk_tokens or chunk_tokens_for(where)
    packable = where.type == "cpu" and precision.dtype in (Dtype.FLOAT32, Dtype.BFLOAT16)
    packed = packed and packable and packed_products(lm.model)
    if kv_cache_bytes and isinstance(lm, DecoderOnlyLM):
        layout = "|packed" if packed else ""  # packed float32 products round otherwise: their segments apart
        prompt = lm.prompt
        namespace = f"{lm.name}|{precision.dtype.value}{layout}|{prompt.template}|{prompt.max_passage_tokens}|{prompt.system_prompt}"
        disk = None
        if kv_cache_dir is not None:  # files outlive the process: name the weights by content, and who computed
            computed_by = f"{content_identity(Path(spec))}|{where.type}|torch {torch.__version__}"
            disk = DiskTier(kv_cache_dir, kv_cache_disk_bytes, f"{namespace}|{computed_by}", where)
        lm.passage_cache = PassageKVCache(kv_cache_bytes, namespace, disk)
    return lm


def chunk_tokens_for(device: torch.device) -> int:
    """Tokens per pass of prompt or scoring work: on a CPU, 512 tokens of the demo model take ~2 s in float32
    and larger passes are barely faster per token; a GPU runs far more in that time."""
    return 512 if device.type == "cpu" else 16384


def resolve_device(device: Device) -> torch.device:
    """The torch device (auto: CUDA when torch sees one)."""
    if device is Device.CUDA and not torch.cuda.is_available():
        raise FailedPrecondition("device cuda, but torch sees no CUDA device here; use auto or cpu")
    cuda = device is Device.CUDA or (device is Device.AUTO and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def _load(spec: str) -> PassageLM:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FailedPrecondition(f"generator {spec!r} does not exist; give a local model directory or .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FailedPrecondition(f"generator {spec!r} is a file but not .gguf; give a model directory")
        return _load_gguf(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise FailedPrecondition(f"generator directory {spec!r} has no config.json")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "rag":
        return _load_rag_checkpoint(path)
    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config.get("is_encoder_decoder"):
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
        return EncoderDecoderLM(model, tokenizer, model.generation_config, name=path.name)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return DecoderOnlyLM(model, tokenizer, model.generation_config, name=path.name)


def _load_rag_checkpoint(path: Path) -> EncoderDecoderLM:
    """The generator of a RagToken/RagSequence checkpoint, with its tokenizer and the RAG input conventions."""
    from transformers import RagConfig, RagTokenForGeneration

    rag_config = RagConfig.from_pretrained(path)
    rag = RagTokenForGeneration.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    tokenizer_dir = path / "generator_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer_dir.exists() else path)
    return EncoderDecoderLM(
        rag.rag.generator,
        tokenizer,
        rag.generation_config,
        name=path.name,
        max_input_tokens=rag_config.max_combined_length,
        title_sep=rag_config.title_sep,
        doc_sep=rag_config.doc_sep,
    )


def _load_gguf(path: Path) -> DecoderOnlyLM:
    log.info("loading GGUF %s (dequantising; save a safetensors copy to load faster)", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return DecoderOnlyLM(model, tokenizer, model.generation_config, name=path.stem)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as safetensors (with its tokenizer) into `out_dir`."""
    from transformers.utils.quantization_config import GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    if not all(p.dtype == torch.float32 for p in model.parameters()):
        raise FailedPrecondition(f"{gguf_path.name} did not dequantise to float32; cannot save it as safetensors")
    _save_plain(model, tokenizer, out_dir)


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """A model directory (safetensors, tokenizer, generation config) that load_passage_lm reads."""
    # A dequantised GGUF model is a plain float32 one: drop the GGUF quantizer so it saves as safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def save_passage_lm(lm: PassageLM, source: str, out_dir: Path) -> None:
    """Save a (fine-tuned) generator in the layout it was loaded from: a `facebook/rag-*` checkpoint stays one
    (with its generator replaced), anything else becomes a plain model directory. Either way the services load
    it like any model."""
    source_path = Path(source).expanduser()
    if source_path.is_dir() and json.loads((source_path / "config.json").read_text()).get("model_type") == "rag":
        from transformers import RagTokenForGeneration

        rag = RagTokenForGeneration.from_pretrained(source_path, use_safetensors=True, dtype=torch.float32)
        rag.rag.generator.load_state_dict(lm.model.state_dict())
        rag.save_pretrained(out_dir, safe_serialization=True)
        for tokenizer_dir in ("generator_tokenizer", "question_encoder_tokenizer"):
            if (source_path / tokenizer_dir).is_dir():
                shutil.copytree(source_path / tokenizer_dir, out_dir / tokenizer_dir)
        return
    _save_plain(lm.model, lm.tokenizer, out_dir)
