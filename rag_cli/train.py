"""`rag train`: fine-tune the query encoder and the generator end to end, the paper's recipe (section 2.4).

    rag train QUESTIONS --index NAME[@VERSION] [--index-root DIR] [--encoder SPEC] [--generator SPEC]
              [--train query-encoder|generator|both] [--mode token|sequence] [--k K] [--epochs N]
              [--max-steps N] [--lr LR] [--batch-size B] [--lora-rank R] [--dev QUESTIONS] [--out DIR]
              [--device auto|cpu|cuda] [--seed S]

One step, for a batch of questions (their first gold answer is the target):
1. retrieve: encode the questions with the *current* query encoder and take the top K passages of the fixed
   index (every shard), with their vectors d as the index stores them;
2. p(z|x) = softmax(q . d / tau): q from the query encoder with gradients, d fixed;
3. p(y_t|x,z,y<t) teacher-forced by the generator (PassageLM.teacher_forced);
4. loss = the RAG-Token or RAG-Sequence negative marginal log-likelihood (generator_svc.rag_math.marginal_nll,
   the math the generator serves with). No passage is labelled: the query encoder learns which passages make
   the answer likely. The document encoder and the index never change.
A frozen generator (`--train query-encoder`) needs no gradient: its p(y|x,z) is computed once per (question,
passage) and reused, which makes that stage cheap on a CPU. AdamW with linear warmup and decay, gradients
clipped at norm 1; bf16 autocast on CUDA.

DIR (default $RAG_HOME/train/<index name>) gets query_encoder/ (a question tower that records the document
encoder it pairs with: `rag up --encoder sentence-transformer:DIR/query_encoder`, or `dpr:question=...`),
generator/ (safetensors, LoRA merged: `rag up --generator DIR/generator`), losses.jsonl, loss.png and
summary.json. checkpoint/ holds the state a rerun of the same command resumes from. The last stdout line is
one JSON object: {"out", "query_encoder", "generator", "steps", "loss_first", "loss_last", "dev"}, where `dev`
holds `rag eval`'s figures on --dev before and after training (per question in DIR/dev-before and DIR/dev-after;
`after.paired` compares them question by question: wins, losses, a sign test).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from generator_svc import rag_math
from generator_svc.config import Device
from generator_svc.loading import load_passage_lm, resolve_device, save_passage_lm
from generator_svc.passage_lm import PassageLM, one_each
from generator_svc.precision import Dtype
from rag import paths
from rag.errors import FailedPrecondition, require
from rag.files import publishing, sha256_file, write_atomically
from rag.fusion import Fusion
from rag.index_ref import IndexRef
from rag.types import Mode, Passage, RetrievalMode
from rag_cli.eval import EvalConfig, Example, read_examples, run_eval
from rag_cli.train_config import MODES, TRAIN_RETRIEVAL, WHAT, TrainConfig
from rag_cli.up import Stack, UpConfig
from retriever_svc.encoders import Encoder, load_encoder
from retriever_svc.layout import MANIFEST, Manifest, resolve
from retriever_svc.resident import check_compatible
from retriever_svc.search import IndexShard

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Plan:
    """The run, parsed and checked before anything is written."""

    questions: Path
    examples: list[Example]
    index: IndexRef
    index_dir: Path
    manifest: Manifest
    mode: Mode
    train_encoder: bool
    train_generator: bool
    out: Path
    device: torch.device


def plan(questions: Path, config: TrainConfig) -> Plan:
    require(config.train in WHAT, f"--train must be one of {', '.join(WHAT)}, got {config.train!r}")
    require(config.mode in MODES, f"--mode must be token or sequence, got {config.mode!r}")
    require(
        config.retrieval in TRAIN_RETRIEVAL,
        f"--retrieval must be dense or hybrid (lexical scores give the query encoder no gradient), got "
        f"{config.retrieval!r}",
    )
    devices = [d.value for d in Device]
    require(config.device in devices, f"--device must be one of {', '.join(devices)}, got {config.device!r}")
    require(config.k >= 1, f"--k must be at least 1, got {config.k}")
    require(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    require(config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}")
    require(config.max_steps >= 0 and config.lora_rank >= 0, "--max-steps and --lora-rank must be >= 0")
    require(config.lr > 0 and math.isfinite(config.lr), f"--lr must be a positive number, got {config.lr}")
    examples = [e for e in read_examples(questions, config.questions_format) if e.answers and e.answers[0].strip()]
    require(bool(examples), f"{questions} holds no question with an answer to train on")
    if config.dev:
        read_examples(Path(config.dev), config.questions_format)  # a bad dev set fails now, not after training
    root = Path(config.index_root)
    wanted = IndexRef.parse(config.index, version_required=False)
    index_dir = resolve(root, wanted)
    manifest = Manifest.from_file(index_dir / MANIFEST)
    require(
        config.k <= manifest.count,
        f"--k {config.k} is more than the {manifest.count} passages {manifest.ref} holds",
    )
    device = resolve_device(Device(config.device))
    out = (Path(config.out) if config.out else paths.rag_home() / "train" / manifest.name).resolve()
    return Plan(
        questions,
        examples,
        manifest.ref,
        index_dir,
        manifest,
        Mode.parse(config.mode),
        config.train in ("query-encoder", "both"),
        config.train in ("generator", "both"),
        out,
        device,
    )


class Retrieval:
    """Top-k search over every shard of the fixed index, dense or hybrid as the retrievers search it, returning
    passages with the vectors the index stores."""

    def __init__(self, index_dir: Path, manifest: Manifest, mode: RetrievalMode) -> None:
        self.shards = [IndexShard(index_dir, shard) for shard in range(manifest.num_shards)]
        self.mode = mode
        self.fusion = Fusion(dense_temperature=manifest.encoder.score_temperature)
        if mode.uses_lexical:
            self.shards[0].require_lexical()

    def search(self, questions: list[str], queries: np.ndarray, k: int) -> list[list[Passage]]:
        keep_all = len(self.shards) > 1
        per_shard = [shard.find(questions, queries, k, self.mode, self.fusion, True, keep_all) for shard in self.shards]
        return [self.fusion.merge([found[b] for found in per_shard], k, self.mode) for b in range(len(questions))]

    def log_prior(self, q: torch.Tensor, passages: list[list[Passage]]) -> torch.Tensor:
        """log p(z|x) as the retrievers score it, with the gradient of the query vectors q [B, D] through q . d:
        dense, softmax(q . d / T); hybrid, softmax(q . d / T + weight * lexical) (the linear fusion)."""
        d = torch.tensor([[x.embedding for x in found] for found in passages], device=q.device)
        dense = torch.einsum("bd,bkd->bk", q.float(), d)
        if self.mode is RetrievalMode.DENSE:
            return rag_math.log_prior(dense, self.fusion.dense_temperature)
        lexical = torch.tensor([[x.lexical_score or 0.0 for x in found] for found in passages], device=q.device)
        return rag_math.log_prior(self.fusion.logit(dense, lexical), 1.0)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class FrozenGenerator:
    """p(y_t|x,z,y<t) of a generator that does not learn: computed once per (question, passage), then reused."""

    def __init__(self, lm: PassageLM) -> None:
        self.lm = lm
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def logprobs(
        self, examples: list[Example], passages: list[list[Passage]], targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, K, T] for the batch's targets (each example's answer is the same in every batch)."""
        lengths = mask.sum(-1).tolist()
        for b, (example, found) in enumerate(zip(examples, passages, strict=True)):
            missing = [p for p in found if (example.id, p.id) not in self.cache]
            if missing:
                rows = self.lm.teacher_forced([example.question], [one_each(missing)], targets[b : b + 1])[0]
                for passage, row in zip(missing, rows, strict=True):
                    self.cache[(example.id, passage.id)] = row[: lengths[b]].float().cpu()
        out = torch.zeros(len(examples), len(passages[0]), targets.shape[1])
        for b, (example, found) in enumerate(zip(examples, passages, strict=True)):
            for k, passage in enumerate(found):
                out[b, k, : lengths[b]] = self.cache[(example.id, passage.id)]
        return out


@dataclass
class Outputs:
    out: Path
    query_encoder: str | None
    generator: str | None
    steps: int
    loss_first: float
    loss_last: float
    dev: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "out": str(self.out),
                "query_encoder": self.query_encoder,
                "generator": self.generator,
                "steps": self.steps,
                "loss_first": self.loss_first,
                "loss_last": self.loss_last,
                "dev": self.dev,
            }
        )


def run_train(questions: Path, config: TrainConfig) -> Outputs:
    transformers.logging.disable_progress_bar()  # weight-loading bars; the training bar is ours
    p = plan(questions, config)
    encoder = load_encoder(config.encoder or p.manifest.encoder.spec)
    retrieval = Retrieval(p.index_dir, p.manifest, RetrievalMode.parse(config.retrieval))
    try:
        for shard in retrieval.shards:
            check_compatible(encoder, shard)
        frozen = not p.train_generator  # its log-likelihoods are constants of the loss: served precision is enough
        dtype = Dtype.parse(config.generator_dtype) if frozen else Dtype.FLOAT32
        lm = load_passage_lm(config.generator, dtype, Device(config.device))
        return _train(p, config, encoder, lm, retrieval)
    finally:
        retrieval.close()


def _fingerprint(p: Plan, config: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    free = ("max_steps", "epochs", "progress", "dev", "out", "device", "checkpoint_every")  # may change on resume
    settings = {k: v for k, v in asdict(config).items() if k not in free}
    return {"questions_sha256": sha256_file(p.questions), "index": str(p.index), **settings}


def _train(p: Plan, config: TrainConfig, encoder: Encoder, lm: PassageLM, retrieval: Retrieval) -> Outputs:
    torch.manual_seed(config.seed)
    for module in (encoder.question_model, lm.model):
        torch.nn.Module.to(module, p.device)
    if p.train_generator and config.lora_rank:
        import peft

        lora = peft.LoraConfig(
            r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules="all-linear", lora_dropout=0.0
        )
        lm.model = peft.get_peft_model(lm.model, lora)
    encoder.question_model.requires_grad_(p.train_encoder)
    if not (p.train_generator and config.lora_rank):
        lm.model.requires_grad_(p.train_generator)
    parameters = [
        q for module in (encoder.question_model, lm.model) for q in module.parameters() if q.requires_grad
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(p.examples) / config.batch_size)
    total = config.max_steps or per_epoch * config.epochs
    warmup = max(1, min(100, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    frozen = None if p.train_generator else FrozenGenerator(lm)
    fingerprint = _fingerprint(p, config)

    checkpoint = p.out / "checkpoint"
    losses: list[float] = []
    step = 0
    if (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=True, map_location=p.device)
        saved = json.loads((checkpoint / "fingerprint.json").read_text())
        if saved != fingerprint:
            raise FailedPrecondition(
                f"{p.out} holds a run with other settings or questions; give another --out (or remove it)"
            )
        _trainable_state(encoder.question_model, load=state["encoder"])
        _trainable_state(lm.model, load=state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = int(state["step"]), [float(x) for x in state["losses"]]
        log.info("resuming %s at step %d", p.out, step)
    p.out.mkdir(parents=True, exist_ok=True)

    autocast: AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if p.device.type == "cuda" else nullcontext()
    )
    started = time.perf_counter()
    with tqdm(
        total=total, initial=step, desc="rag train", unit="step", disable=not config.progress, file=sys.stderr
    ) as bar:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(len(p.examples), generator=torch.Generator().manual_seed(config.seed + epoch))
            chosen = order[offset * config.batch_size : (offset + 1) * config.batch_size].tolist()
            batch = [p.examples[i] for i in chosen]
            texts = [e.question for e in batch]
            targets, mask = rag_math.answer_targets(
                [lm.answer_token_ids(e.answers[0]) for e in batch], lm.rules.pad_token_id
            )
            with autocast:
                # One encoding of the questions: it retrieves (detached) and gives p(z|x) its gradient.
                if p.train_encoder:
                    q = encoder.question_vectors(texts)
                else:
                    q = torch.from_numpy(encoder.encode_questions(texts)).to(p.device)
                passages = retrieval.search(texts, q.detach().float().cpu().numpy(), config.k)
                prior = retrieval.log_prior(q, passages)
                if frozen is not None:
                    logprobs = frozen.logprobs(batch, passages, targets, mask).to(p.device)
                else:
                    logprobs = lm.teacher_forced(texts, [one_each(found) for found in passages], targets)
                loss = rag_math.marginal_nll(logprobs.float(), mask, prior, p.mode).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if step % config.checkpoint_every == 0 or step == total:
                _save_checkpoint(checkpoint, fingerprint, step, losses, encoder, lm, optimizer, schedule)
    log.info("trained %d steps in %.0f s on %s", step, time.perf_counter() - started, p.device)
    return _finish(p, config, encoder, lm, losses)


def _trainable_state(model: torch.nn.Module, load: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights that learn (LoRA adapters only, when there are any); with `load`, put them back."""
    names = {name for name, q in model.named_parameters() if q.requires_grad}
    if load is not None:
        missing = set(model.load_state_dict(load, strict=False).missing_keys) & set(load)
        if missing:
            raise FailedPrecondition(f"the checkpoint does not fit this model ({sorted(missing)[:3]} ...)")
    return {name: value for name, value in model.state_dict().items() if name in names}


def _save_checkpoint(
    checkpoint: Path,
    fingerprint: dict[str, Any],
    step: int,
    losses: list[float],
    encoder: Encoder,
    lm: PassageLM,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Everything a rerun resumes from, replaced atomically (a crash leaves the previous checkpoint)."""
    with publishing(checkpoint) as tmp:
        tmp.mkdir()
        state = {
            "step": step,
            "losses": losses,
            "encoder": _trainable_state(encoder.question_model),
            "generator": _trainable_state(lm.model),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2))


def _finish(p: Plan, config: TrainConfig, encoder: Encoder, lm: PassageLM, losses: list[float]) -> Outputs:
    """Write the models (LoRA merged), the loss curve and the summary; evaluate on --dev before and after."""
    if p.train_generator and config.lora_rank:
        lm.model = lm.model.merge_and_unload()
    for module in (encoder.question_model, lm.model):
        torch.nn.Module.to(module, "cpu")
    query_encoder = generator = None
    if p.train_encoder:
        query_encoder = p.out / "query_encoder"
        with publishing(query_encoder) as tmp:
            encoder.save_question_tower(tmp, p.manifest.encoder)
        query_encoder_spec = encoder.question_tower_spec(query_encoder)
    if p.train_generator:
        generator = p.out / "generator"
        with publishing(generator) as tmp:
            tmp.mkdir()
            save_passage_lm(lm, config.generator, tmp)
    (p.out / "losses.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses))
    )
    _plot(losses, p.out / "loss.png", f"rag train ({p.mode.label}, k={config.k}, {config.train})")
    dev = None
    if config.dev:
        after_encoder = query_encoder_spec if query_encoder else config.encoder
        after_generator = str(generator) if generator else config.generator
        before, after = p.out / "dev-before", p.out / "dev-after"
        shutil.rmtree(after, ignore_errors=True)  # the models just trained: nothing of an earlier run's applies
        dev = {
            "before": _evaluate(Path(config.dev), p, config, config.encoder, config.generator, before),
            "after": _evaluate(Path(config.dev), p, config, after_encoder, after_generator, after, against=before),
        }
    outputs = Outputs(
        p.out,
        str(query_encoder) if query_encoder else None,
        str(generator) if generator else None,
        len(losses),
        losses[0] if losses else float("nan"),
        float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else float("nan"),
        dev,
    )
    summary = {**json.loads(outputs.to_json()), "query_encoder_spec": query_encoder_spec if query_encoder else None}
    write_atomically(p.out / "summary.json", json.dumps(summary, indent=2))
    return outputs


def _evaluate(
    dev: Path, p: Plan, config: TrainConfig, encoder: str, generator: str, out: Path, against: Path | None = None
) -> dict[str, Any]:
    """`rag eval` on the dev questions through a `rag up` stack serving these models over the same index; the
    per-question results go to `out` (resumable), compared question by question with `against`'s."""
    stack = Stack(
        UpConfig.on_free_ports(index_root=config.index_root, index=str(p.index), encoder=encoder, generator=generator)
    )
    try:
        gateway = stack.start()
        summaries = run_eval(
            dev,
            EvalConfig(
                gateway=gateway,
                mode=p.mode.value,
                k=config.k,
                questions_format=config.questions_format,
                progress=False,
                out=str(out),
                against=str(against) if against else "",
            ),
        )
    finally:
        stack.stop()
    return summaries[-1]


def _plot(losses: list[float], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # an optional dependency (pip install 'rag-grpc[eval]'): the losses are in losses.jsonl
        log.warning("matplotlib is not installed: no %s (the losses are in losses.jsonl)", path.name)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    steps = np.arange(1, len(losses) + 1)
    axes.plot(steps, losses, alpha=0.35, label="loss per step")
    window = max(1, len(losses) // 10)
    if window > 1:  # batches differ: the trend shows in a running mean
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1 :], smooth, label=f"mean of {window} steps")
    axes.set_xlabel("step")
    axes.set_ylabel("negative marginal log-likelihood")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with publishing(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
