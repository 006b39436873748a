"""Random-weight models built from configs, for tests and benchmarks (no weights exist offline here).

Everything is saved like a real checkpoint (safetensors + tokenizer files), so the services load these
exactly as they load real models:
- `save_rag_checkpoint`: a `facebook/rag-*`-layout checkpoint (DPR question encoder + BART generator, with
  `question_encoder_tokenizer/` and `generator_tokenizer/`), loadable by transformers' RagTokenForGeneration;
- `save_dpr_encoders`: DPR question and context encoders;
- `save_sentence_encoder`: a BERT with sentence-transformers pooling files (mean pooling, normalised);
- `save_causal_lm`: a small Qwen2-style chat LM with a chat template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    RagConfig,
    RagTokenForGeneration,
)

# Enough text for a byte-level BPE that tokenizes anything (bytes are always in the alphabet).
_TRAINING_TEXT = [
    "Alexander Fleming discovered penicillin in 1928 at St Mary's Hospital in London.",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog. Who, what, when, where, why and how?",
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
    "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer)
    return tokenizer


def bart_tokenizer() -> PreTrainedTokenizerFast:
    """BART's special-token layout: <s>=0 <pad>=1 </s>=2 <unk>=3, inputs wrapped as <s> ... </s>."""
    tokenizer = byte_bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """BERT's layout: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, inputs wrapped as [CLS] ... [SEP]."""
    tokenizer = byte_bpe_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = byte_bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bart_config(vocab_size: int, shape: BartShape, init_std: float) -> BartConfig:
    return BartConfig(
        init_std=init_std,
        vocab_size=vocab_size,
        d_model=shape.d_model,
        encoder_layers=shape.layers,
        decoder_layers=shape.layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn,
        decoder_ffn_dim=shape.ffn,
        max_position_embeddings=shape.positions,
    )


@dataclass(frozen=True)
class BartShape:
    d_model: int = 32
    layers: int = 2
    heads: int = 2
    ffn: int = 64
    positions: int = 1024  # bart-base's; fewer make a model whose answers run out of positions


BART_BASE = BartShape(d_model=768, layers=6, heads=12, ffn=3072)


def save_rag_checkpoint(
    out_dir: Path,
    seed: int = 0,
    shape: BartShape = BartShape(),
    n_docs: int = 5,
    init_std: float = 0.2,
    generation: Mapping[str, object] | None = None,
    vocab_size: int = 0,
) -> RagTokenForGeneration:
    """A RAG checkpoint in the `facebook/rag-*` layout (a tiny BART generator unless `shape` says otherwise).

    `init_std` 0.2 (BART's own is 0.02) makes outputs depend on the passage, so marginalising over passages
    matters in tests. `generation` sets generation-config fields (e.g. no_repeat_ngram_size). `vocab_size`
    widens the output layer beyond the small test tokenizer (bart-base: 50265), for realistic timings.
    """
    torch.manual_seed(seed)
    generator_tokenizer, question_tokenizer = bart_tokenizer(), bert_tokenizer()
    vocab = max(vocab_size, len(generator_tokenizer))
    bart = BartForConditionalGeneration(_bart_config(vocab, shape, init_std))
    dpr_config = DPRConfig(
        vocab_size=len(question_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    question_encoder = DPRQuestionEncoder(dpr_config)
    config = RagConfig.from_question_encoder_generator_configs(dpr_config, bart.config, n_docs=n_docs)
    rag = RagTokenForGeneration(config=config, question_encoder=question_encoder, generator=bart).eval()
    for key, value in (generation or {}).items():
        setattr(rag.generation_config, key, value)
    rag.save_pretrained(out_dir, safe_serialization=True)
    generator_tokenizer.save_pretrained(out_dir / "generator_tokenizer")
    question_tokenizer.save_pretrained(out_dir / "question_encoder_tokenizer")
    return rag


def save_dpr_encoders(out_dir: Path, seed: int = 0, hidden: int = 32) -> tuple[Path, Path]:
    """DPR question and context encoders (separate towers, CLS pooler output)."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    config = DPRConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    paths = []
    for name, cls in (("question_encoder", DPRQuestionEncoder), ("ctx_encoder", DPRContextEncoder)):
        path = out_dir / name
        cls(config).eval().save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def save_sentence_encoder(out_dir: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A BERT with sentence-transformers' files: mean pooling, normalised, like all-MiniLM-L6-v2."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    BertModel(config).eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    (out_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    (out_dir / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (out_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return out_dir


def save_causal_lm(
    out_dir: Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    init_std: float = 0.2,
    tied: bool = True,
    positions: int = 32768,
) -> Path:
    """A small Qwen2-style chat LM (grouped-query attention, rotary positions, a chat template, Qwen2.5-0.5B's
    32,768 positions unless `positions` says otherwise); `tied`: the vocabulary projection is the input embeddings
    (Qwen2.5-0.5B's own checkpoint), or its own weight (the demo's conversion of its GGUF)."""
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
        initializer_range=init_std,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
