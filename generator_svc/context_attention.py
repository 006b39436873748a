"""Attention that reads what many decoder rows share without copying it to each row.

While decoding, every decoder row reads one context row: the rows of a RAG request are (question, beam,
passage) or (question, passage, beam), and all beams of a passage read that passage. What a context row holds
is computed once by `PassageLM.encode`:
- a decoder-only LM's prompt: the self-attention keys and values of [shared prefix][padding][own tokens];
- an encoder-decoder's encoder output, projected to every decoder layer's cross-attention keys and values.

A plain cache would give each decoder row its own copy of these (N beams x K passages copies of K prompts),
append every new token by copying the whole row again (torch.cat), and copy it once more on every beam
reorder. Here the decoder rows' cache holds only the tokens they decoded; the attention function reads the
context part in place, grouping the queries of the rows that read the same context row (cascade attention,
as in FlashInfer and Hydragen), and one softmax runs over [context part][own part]. That is the same
attention as over the concatenated row, with nothing copied: a step costs the reads it needs.

The function is registered with transformers' attention interface and takes over only when the model is
called with `shared_context=`; otherwise (encoding, training) it is transformers' SDPA attention, with
SDPA's masks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from rag.errors import FailedPrecondition

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [rows, heads, length, head_dim]

NAME = "rag_shared_context"


class SharedContext:
    """The context rows that decoder rows read: decoder row r reads context row `rows[r]`.

    `prompt` is a decoder-only LM's per-layer prompt cache [C, kv_heads, L, head_dim] (None for an
    encoder-decoder, whose cross-attention cache holds the context instead), `mask` [C, L] marks the real
    tokens of the context (prompt or encoder input). What the attention indexes with sits on the model's
    `device` from the start: every layer of every step reads it.
    """

    def __init__(
        self, rows: torch.Tensor, mask: torch.Tensor, layers: int, device: torch.device, prompt: KV | None = None
    ) -> None:
        self.prompt = prompt
        # [R, S]: which of the rows' own cached tokens are real (None: all). Rows decoded together from different
        # requests (generator_svc.joint) hold slots another row's tokens needed, and drafts they did not keep.
        self.own_valid: torch.Tensor | None = None
        self.layers = layers  # the decoder layers that must read the context on every forward pass
        self.reads = 0  # attention calls that read it so far (see `check_read`)
        counts = torch.bincount(rows, minlength=len(mask))
        # Rows that read a context row the same number of times (each beam reads each passage once) attend in
        # groups, one per context row. Otherwise (answers of unequal counts per question) the context is
        # gathered per row for the call: correct, with the copy a plain cache would have made.
        uniform = bool((counts == counts[0]).all())
        self.gather = None if uniform else rows.to(device)
        order = torch.argsort(rows, stable=True) if uniform else None
        if order is not None and torch.equal(order, torch.arange(len(rows))):
            order = None  # rows already grouped (greedy RAG-Token's): four gathers per layer and step saved
        self.order = None if order is None else order.to(device)
        self.inverse = None if order is None else torch.argsort(order).to(device)
        bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(mask == 0, float("-inf"))
        self.bias = (bias if uniform else bias[rows]).to(device)[:, None, None, :]  # [C or R, 1, 1, L]

    def check_read(self) -> None:
        """After a forward pass: every layer read the context through this module's attention."""
        if self.reads != self.layers:
            raise FailedPrecondition(
                "the generator's attention does not go through transformers' attention interface "
                f"({self.reads} of {self.layers} layers read the shared context); this model cannot be served"
            )
        self.reads = 0

    def _context(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gather is not None:
            return keys[self.gather], values[self.gather]
        return keys, values

    def _grouped(self, x: torch.Tensor, contexts: int, kv_heads: int) -> torch.Tensor:
        """[R, H, T, E] -> [C, kv_heads, rows per context * heads per kv head * T, E]: the queries (or
        probabilities) of the rows reading each context row, as one batch entry per context row."""
        R, H, T, E = x.shape
        if self.order is not None:
            x = x[self.order]
        per = R // contexts
        return (
            x.reshape(contexts, per, kv_heads, H // kv_heads, T, E).transpose(1, 2).reshape(contexts, kv_heads, -1, E)
        )

    def _ungrouped(self, y: torch.Tensor, rows: int, heads: int, length: int) -> torch.Tensor:
        C, kv_heads, _, E = y.shape
        y = y.view(C, kv_heads, rows // C, heads // kv_heads, length, E).transpose(1, 2).reshape(rows, heads, length, E)
        return y[self.inverse] if self.inverse is not None else y

    def attend(
        self,
        query: torch.Tensor,
        context: tuple[torch.Tensor, torch.Tensor],
        own: tuple[torch.Tensor, torch.Tensor] | None,
        scaling: float,
    ) -> torch.Tensor:
        """softmax(q . [context; own]) . [context; own] for queries [R, H, T, D]; the own part (the row's
        decoded tokens, [R, kv_heads, S, D], the last T of them being the queries') is causal. [R, T, H, D]"""
        self.reads += 1
        R, H, T, D = query.shape
        keys, values = self._context(*context)
        C, kv_heads, L = keys.shape[:3]
        scores = (self._grouped(query, C, kv_heads) @ keys.transpose(-1, -2)).float() * scaling + self.bias
        if own is not None:
            own_keys, own_values = own
            S = own_keys.shape[2]
            own_scores = query.reshape(R, kv_heads, -1, D) @ own_keys.transpose(-1, -2)  # GQA without copying keys
            own_scores = own_scores.view(R, H, T, S).float().mul(scaling)
            if T > 1:  # one query (a plain decoding step) is the row's last token: nothing of its own is ahead
                future = torch.ones(T, S, dtype=torch.bool, device=query.device).triu(S - T + 1)
                own_scores = own_scores.masked_fill(future, float("-inf"))
            if self.own_valid is not None:
                own_scores = own_scores.masked_fill(~self.own_valid[:, None, None, :S], float("-inf"))
            scores = torch.cat([scores, self._grouped(own_scores, C, kv_heads)], dim=-1)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = self._ungrouped(probs[..., :L] @ values, R, H, T)
        if own is not None:
            own_probs = self._ungrouped(probs[..., L:], R, H, T).reshape(R, kv_heads, -1, S)
            out = out + (own_probs @ own_values).view(R, H, T, D)
        return out.transpose(1, 2).contiguous()


def shared_context_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    shared_context: SharedContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. Self-attention layers are causal (`module.is_causal`);
    cross-attention layers are not, and their key/value are the context itself, one row per context row."""
    if shared_context is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if not module.is_causal:  # cross-attention: the encoder states the cache shares
        return shared_context.attend(query, (key, value), None, scaling), None
    if shared_context.prompt is None:  # an encoder-decoder's own self-attention: nothing shared
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = int(module.layer_idx)  # type: ignore[arg-type]  # every decoder attention module has its index
    return shared_context.attend(query, shared_context.prompt[layer], (key, value), scaling), None


AttentionInterface.register(NAME, shared_context_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model: PreTrainedModel) -> None:
    """Make the model's attention this module's (SDPA unless called with `shared_context=`)."""
    unsupported = _unsupported(model.config)
    if unsupported:
        raise FailedPrecondition(f"the generator uses {unsupported}, which decoding from shared contexts cannot read")
    model.set_attn_implementation(NAME)


def _unsupported(config: Any) -> str | None:
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None
