"""transformers' own RAG models as the reference our decoding is compared with (tests and `rag bench`)."""

from __future__ import annotations

from typing import Any

import torch


def mask_rag_sequence_padding(model: Any) -> None:
    """RagSequenceForGeneration.generate calls `generator.generate(..., attention_mask=None)`. transformers 4
    then inferred the mask from the padding; transformers 5 infers it only for decoder-only models, so BART
    attends to the 300-token padding of every passage. Restore the masked call, as transformers 4 ran it."""
    generate = model.generator.generate
    pad = model.config.generator.pad_token_id

    def with_mask(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = input_ids.ne(pad).long()
        return generate(input_ids, **kwargs)

    model.generator.generate = with_mask


def generated_tokens(rows: torch.Tensor, pad_token_id: int) -> list[tuple[int, ...]]:
    """transformers' output rows without the decoder start token and the padding after the end."""
    out = []
    for row in rows.tolist():
        row = row[1:]
        while row and row[-1] == pad_token_id:
            row.pop()
        out.append(tuple(row))
    return out
