"""The precision a generator's weights are served in, and how the hardware and the quality rule decide it.

`auto` (the default) is bfloat16 where the hardware computes in it natively (a CUDA GPU with bfloat16, or a CPU
with AMX-BF16 or AVX512-BF16: read from the CPU's flags, not from the torch build), where it is 2-2.5x faster than
float32, and float32 elsewhere, where torch emulates bfloat16 more slowly than float32. A precision must keep the
quality rule in every RAG mode a user may ask for (first-token KL and argmax agreement on held-out prompts; EM and
F1 within 0.02 of float32): bfloat16, with the logits that decide in float32 (NearTopFloat32Logits), keeps it on
the demo model (docs/results.md); were a mode to fail it, `auto` would stay float32 and say so. int8 is opt-in.
Log-probabilities are float32 whatever the weights.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rag.errors import FailedPrecondition
from rag.host import cpu_flags
from rag.types import from_word


class Dtype(enum.Enum):
    """What --dtype accepts: a precision to serve weights in, or auto (decided here)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"

    @classmethod
    def parse(cls, text: str) -> Dtype:
        return from_word(cls, text, "dtype")


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Whether bfloat16 keeps the quality rule, per RAG mode (bench/precision_check.py --answers 100 on a CPU with native
# bfloat16, 2026-12-07, docs/precision-check-epyc-neartop.json, the logits near the top in float32: first-token KL
# 0.0010, argmax kept 199 of 200; EM 0.27 vs 0.27 RAG-Token, 0.36 vs 0.38 RAG-Sequence, F1 within 0.012). One model
# serves both modes, so auto picks bfloat16 only when it keeps the rule in all of them.
BFLOAT16_KEEPS_QUALITY = {"RAG-Token": True, "RAG-Sequence": True}


@dataclass(frozen=True)
class Precision:
    """The dtype a model is served in, and why: `basis` a fixed label (the info metric's), `reason` in words."""

    dtype: Dtype  # never AUTO
    basis: str  # asked | native_bfloat16 | no_native_bfloat16 | bfloat16_below_quality_rule
    reason: str


def choose_precision(requested: Dtype, device: torch.device, flags: set[str] | None = None) -> Precision:
    """`requested` (auto or a dtype) resolved for `device`; `flags` are the CPU's (read when not given)."""
    if device.type == "cuda" and requested is Dtype.INT8:
        raise FailedPrecondition("int8 runs on a CPU only (torch's dynamic quantisation); use bfloat16 on a GPU")
    if requested is not Dtype.AUTO:
        return Precision(requested, "asked", f"--dtype {requested.value}")
    native = native_bfloat16(device, flags)
    if native is None:
        return Precision(Dtype.FLOAT32, "no_native_bfloat16", "auto: no native bfloat16 here, float32 is faster")
    failing = [mode for mode, kept in BFLOAT16_KEEPS_QUALITY.items() if not kept]
    if failing:
        return Precision(
            Dtype.FLOAT32,
            "bfloat16_below_quality_rule",
            f"auto: {native}, but bfloat16 does not keep the quality rule in {' and '.join(failing)} "
            "(docs/results.md); --dtype bfloat16 serves it",
        )
    return Precision(Dtype.BFLOAT16, "native_bfloat16", f"auto: {native}")


def native_bfloat16(device: torch.device, flags: set[str] | None = None) -> str | None:
    """Why `device` computes in bfloat16 natively, or None where torch would emulate it; `flags` are the CPU's
    (read when not given)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} computes in bfloat16" if torch.cuda.is_bf16_supported() else None
    native = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    return f"the CPU computes in bfloat16 ({', '.join(native)})" if native else None


# The MLP's output projection of each family (Llama/Qwen/SmolLM, BART, T5). Its input carries a few very large
# activations (SwiGLU and GELU outliers) that one int8 scale per tensor flattens: quantising it too moved Qwen2.5's
# first-token distributions by a KL of 0.45 nats, keeping it in float32 by 0.05.
KEEP_FLOAT = ("down_proj", "fc2", "wo")


def with_precision(model: PreTrainedModel, dtype: Dtype) -> PreTrainedModel:
    """The model for serving in `dtype`: float32 (the reference); bfloat16 (half the memory; fast only where the
    CPU or GPU computes in it); int8 (torch's dynamic quantisation: the Linear layers' weights in int8 with a scale
    per output channel, activations quantised on the fly, so the matrix products, most of the time on a CPU, run in
    int8; the layers named in KEEP_FLOAT stay float32). Log-probabilities are always computed in float32."""
    if dtype is Dtype.BFLOAT16:
        model = torch.nn.Module.to(model, torch.bfloat16)
        near_top_float32_logits(model)
        return model
    if dtype is Dtype.INT8:
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        layers = {
            name: per_channel_dynamic_qconfig
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FLOAT
        }
        with warnings.catch_warnings():  # torch announces a move of these kernels to torchao; they still run
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, layers, dtype=torch.qint8)
    return model


# oneDNN picks its blocking for this many rows, a decode step's at k = 5; other row counts run on it as fast.
PACKED_FOR_ROWS = 5


class PackedLinear(torch.nn.Module):
    """A Linear layer whose weight is held in oneDNN's blocked layout, packed once at load, for serving on a CPU.

    torch's CPU products against a Linear weight as stored read it far below the memory's bandwidth for the few rows
    of a decode step: on an AMD EPYC (2 cores, ~29 GB/s), 5 rows against Qwen2.5-0.5B's block weights ran at
    12 GB/s in bfloat16 and 8 GB/s in float32; packed, at 23-24 GB/s in both. A 5-row decoding step of the whole
    model fell from 140 to 85 ms in bfloat16, and in float32 from 185 ms (W.x^T for the wide layers, the path
    before this one) to 90 ms. The same arithmetic as the Linear layer in another order (bfloat16: the same
    numbers; float32: within rounding). No gradient flows through it: a generator that learns is loaded unpacked."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # a loss would silently miss this layer's weight
            raise RuntimeError(
                "a packed Linear layer passes no gradient: load a generator that learns with packed=False"
            )
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedHead(torch.nn.Linear):
    """A vocabulary projection tied to the embeddings (so its weight stays where it is) that multiplies by a packed
    copy of it (`packed`, set by `packed_products`)."""

    packed: PackedLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)


class NearTopFloat32Logits(torch.nn.Linear):
    """The vocabulary projection of a bfloat16 model: the product in bfloat16, then the logits that can decide a
    choice recomputed in float32.

    A bfloat16 logit keeps 8 significant bits, a step of 0.125 at the top logits' magnitudes (16-32): near-ties
    between answer tokens, and the sums of log-probabilities RAG-Sequence compares across passages, became coin
    flips. The projection's inputs (the final norm's output) and weights are bfloat16 numbers, and the product
    accumulates in float32, so the bfloat16 product differs from a float32 one only by rounding each logit to 8 bits:
    by at most eps = 2^-8 of the row's largest |logit|. A token whose rounded logit is more than
    ln(rows) + 2 eps below its row's largest can be the top neither of that row nor of a mixture of up to `rows`
    rows (RAG-Token's marginal over passages); every other token of any row is recomputed in float32 for all rows,
    from the same numbers, which is what a float32 projection computes. The rest keep the rounding, which moves a
    row's log-softmax normaliser by a small share of eps. A float32 copy of the weights read twice the bytes each
    step (31 against 21 ms for 5 rows of Qwen2.5-0.5B on an AMD EPYC) and held 544 MB more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = getattr(self, "packed", None)  # a packed copy of the weight, where packed_products made one
        logits = (super().forward(x) if packed is None else packed(x)).float()
        flat = logits.view(-1, self.out_features)
        # amax/amin and "some row's margin above its threshold >= 0" select what aminmax and (flat >= threshold)
        # .any(0) do (a float difference is >= 0 exactly when a >= b), at a fifth of their time on a CPU (1.6 ->
        # 0.3 ms a 5-row step of a 151,936-token vocabulary, AMD EPYC).
        top = flat.amax(-1, keepdim=True)
        eps = torch.maximum(top.abs(), flat.amin(-1, keepdim=True).abs()) * 2.0**-8
        threshold = top - math.log(flat.shape[0]) - 2 * eps
        near_top = ((flat - threshold).amax(0) >= 0).nonzero().squeeze(-1)
        exact = x.reshape(-1, self.in_features).float() @ self.weight[near_top].float().T
        if self.bias is not None:
            exact = exact + self.bias[near_top].float()
        return flat.index_copy(1, near_top, exact).view(logits.shape)


def near_top_float32_logits(model: PreTrainedModel) -> None:
    """Make the model's vocabulary projection NearTopFloat32Logits (the same bfloat16 weights, still tied)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.__class__ = NearTopFloat32Logits


def logits_precision(model: PreTrainedModel) -> str:
    """What the model's logits are computed in, as tables of its scores name it (rag_cli.likelihoods)."""
    head = model.get_output_embeddings()
    if isinstance(head, NearTopFloat32Logits):
        return "float32 near the top"
    weight = head.weight() if callable(head.weight) else head.weight  # int8 layers hand their weight out
    return str(weight.dtype).removeprefix("torch.")


def packed_products(model: PreTrainedModel) -> bool:
    """For serving on a CPU in float32 or bfloat16: every Linear layer of the model a PackedLinear (its weight
    packed, the stored layout freed; the vocabulary projection too, or a packed copy beside its weight where that is
    tied to the embeddings or recomputes near-top logits), and what is left as loaded copied out of the weights
    file. False, and the model as it was, where this torch build cannot pack (no oneDNN, or none for this CPU or
    dtype)."""
    try:
        PackedLinear(torch.zeros(8, 8, dtype=model.dtype), None)
    except RuntimeError:
        return False
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    tied = isinstance(head, torch.nn.Linear) and head.weight is embeddings.weight
    linears = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and not (child is head and tied)  # an untied head packs like the rest
    ]
    for parent, name in linears:  # one at a time, so each layer's stored weight is freed before the next is packed
        child = getattr(parent, name)
        setattr(parent, name, PackedLinear(child.weight, child.bias))
        del child
    if tied and type(head) is torch.nn.Linear:
        head.__class__ = PackedHead
    if isinstance(head, PackedHead | NearTopFloat32Logits):
        head.packed = PackedLinear(head.weight, head.bias)
    model.requires_grad_(False)  # served, not trained: a caller that turns gradients back on meets PackedLinear's error
    _out_of_the_file(model)
    return True


def _out_of_the_file(model: PreTrainedModel) -> None:
    """Copy the tensors packing leaves as loaded (embeddings, norms, biases) into the process's own memory where they
    are not there already, tensors sharing storage (tied weights) still sharing it. Loaded in float32 from
    safetensors they are views of the file's mapping (storage torch did not allocate, so not resizable), which keeps
    resident every page packing read, the Linear weights' too, never read again: 1.9 GiB of the demo model, counted
    in the process's memory until the kernel reclaims it. Copied, the mapping is released. Converted on load
    (bfloat16), they are torch's own already: nothing to copy."""
    copies: dict[int, torch.UntypedStorage] = {}  # by the loaded storage's address
    for tensor in [*model.parameters(), *model.buffers()]:  # each once
        storage = tensor.untyped_storage()
        if storage.resizable():
            continue
        if storage.data_ptr() not in copies:
            copies[storage.data_ptr()] = storage.clone()
        own = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        tensor.data = own.set_(copies[storage.data_ptr()], tensor.storage_offset(), tensor.shape, tensor.stride())
