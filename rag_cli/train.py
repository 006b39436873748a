"""`rag train`: fine-tune the query encoder and the generator end to end, the paper's recipe (section 2.4).

    rag train QUESTIONS --index NAME[@VERSION] [--index-root DIR] [--encoder SPEC] [--generator SPEC]
              [--train query-encoder|generator|both] [--mode sequence|token] [--k K] [--epochs N]
              [--max-steps N] [--lr LR] [--batch-size B] [--lora-rank R] [--encoder-lora-rank R]
              [--held-out F] [--eval-every N] [--patience N] [--candidates N] [--likelihoods FILE]
              [--oracle-reader] [--dev QUESTIONS] [--out DIR] [--device auto|cpu|cuda] [--seed S]
    torchrun --nproc-per-node N -m rag_cli train ...     (data-parallel: rag_cli.distributed)

One step, for a batch of questions (their first gold answer is the target):
1. retrieve: encode the questions with the *current* query encoder and take the top K passages of the fixed
   index (every shard), with their vectors d as the index stores them;
2. p(z|x) = softmax(q . d / tau): q from the query encoder with gradients, d fixed;
3. p(y_t|x,z,y<t) from the generator;
4. loss = the RAG-Sequence (default) or RAG-Token negative marginal log-likelihood (generator_svc.rag_math.
   marginal_nll, the math the generator serves with). No passage is labelled: the query encoder learns which
   passages make the answer likely. The document encoder and the index never change.
A generator that learns (`--train generator|both`) is teacher-forced with gradients at every step. A frozen one
(`--train query-encoder`) needs no gradient: its p(y|x,z) is read from a saved likelihood table
(rag_cli.likelihoods), scored up front for each question's top `--candidates` passages and lazily for any that
enters a top K later, so the steps are cheap and many; `--oracle-reader` fills the table without a generator
(0 where the passage holds an answer, -10 elsewhere), a diagnostic that bounds what the query encoder can gain.
AdamW with linear warmup and decay, gradients clipped at norm 1; bf16 autocast on CUDA. A `--held-out` share of
the questions (whole gold passages) is never trained on: the marginal NLL on it is measured before training and
every `--eval-every` steps, the best models by it are kept, and training stops after `--patience` evaluations
without improvement.

DIR (default $RAG_HOME/train/<index name>) gets query_encoder/ (a question tower that records the document
encoder it pairs with: `rag up --encoder sentence-transformer:DIR/query_encoder`, or `dpr:question=...`),
generator/ (safetensors, LoRA merged: `rag up --generator DIR/generator`), likelihoods.sqlite (a frozen
generator's table), losses.jsonl, loss.png and summary.json. checkpoint/ holds the state a rerun of the same
command resumes from. The last stdout line is one JSON object: {"out", "query_encoder", "generator", "steps",
"loss_first", "loss_last", "held_out", "likelihoods", "dev"}, where `dev` holds `rag eval`'s figures on --dev
before and after training (per question in DIR/dev-before and DIR/dev-after; `after.paired` compares them question
by question: wins, losses, a sign test).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from generator_svc import rag_math
from generator_svc.config import Device
from generator_svc.loading import load_passage_lm, resolve_device, save_passage_lm
from generator_svc.passage_cache import auto_budget_bytes, half_the_free_space
from generator_svc.passage_lm import PassageLM, one_each
from generator_svc.precision import Dtype
from rag import paths
from rag.errors import FailedPrecondition, require
from rag.files import publishing, sha256_file, write_atomically
from rag.fusion import Fusion
from rag.index_ref import IndexRef
from rag.types import Mode, Passage, RetrievalMode
from rag_cli import distributed
from rag_cli.distributed import Ranks
from rag_cli.eval import EvalConfig, Example, read_examples, run_eval
from rag_cli.likelihoods import GeneratorScorer, LikelihoodTable, OracleReader, Pair, Scorer
from rag_cli.train_config import MODES, TRAIN_RETRIEVAL, Learns, TrainConfig
from rag_cli.up import Stack, UpConfig
from retriever_svc.encoders import Encoder, load_encoder, with_question_adapter
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
    held_out: list[Example]  # kept out of training: the marginal NLL on them picks the checkpoint
    mode: Mode
    train_encoder: bool
    train_generator: bool
    out: Path
    likelihoods: Path  # the frozen generator's likelihood table
    candidates: int  # passages per question scored into it up front
    device: torch.device


def plan(questions: Path, config: TrainConfig) -> Plan:
    learns = Learns.parse(config.train)
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
    require(
        min(config.max_steps, config.lora_rank, config.encoder_lora_rank) >= 0,
        "--max-steps, --lora-rank and --encoder-lora-rank must be >= 0",
    )
    require(
        not config.encoder_lora_rank or learns.encoder,
        "--encoder-lora-rank trains the query encoder: give --train query-encoder or both",
    )
    require(
        config.candidates == 0 or config.candidates >= config.k,
        f"--candidates must be at least --k ({config.k}), or 0 for 2k; got {config.candidates}",
    )
    require(0 <= config.held_out < 1, f"--held-out must be a fraction in [0, 1), got {config.held_out}")
    require(config.eval_every >= 0 and config.patience >= 1, "--eval-every must be >= 0 and --patience >= 1")
    require(
        not config.oracle_reader or learns is Learns.QUERY_ENCODER,
        "--oracle-reader replaces the generator, so only the query encoder can learn: give --train query-encoder",
    )
    require(
        not config.kv_cache_dir or not learns.generator,
        "--kv-cache-dir caches a frozen generator's passages, and this generator learns: give --train query-encoder "
        "or drop --kv-cache-dir",
    )
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
    training, held_out = split_held_out(examples, config.held_out, config.seed)
    return Plan(
        questions,
        training,
        manifest.ref,
        index_dir,
        manifest,
        held_out,
        Mode.parse(config.mode),
        learns.encoder,
        learns.generator,
        out,
        Path(config.likelihoods).resolve() if config.likelihoods else out / "likelihoods.sqlite",
        min(config.candidates or 2 * config.k, manifest.count),
        device,
    )


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """About `fraction` of the questions, whole gold passages at a time (a question without one stands alone), so
    no held-out question shares its passage with a trained one. Fewer than one group's worth: nothing is held out."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.gold_passage or example.id, []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    wanted, held, count = int(fraction * len(examples)), set[str](), 0
    for key in keys:
        if count >= wanted:
            break
        held.add(key)
        count += len(groups[key])
    chosen = {id(e) for key in held for e in groups[key]}
    return [e for e in examples if id(e) not in chosen], [e for e in examples if id(e) in chosen]


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


@dataclass
class Outputs:
    out: Path
    query_encoder: str | None
    generator: str | None
    steps: int
    loss_first: float
    loss_last: float
    held_out: dict[str, Any] | None  # questions, the NLL at each evaluation, the step kept, whether it stopped early
    likelihoods: dict[str, Any] | None  # the table: path, pairs held, pairs this run scored
    dev: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "out": str(self.out)})


def run_train(questions: Path, config: TrainConfig) -> Outputs | None:
    """Train; the outputs on rank 0 (the only process unless torchrun started several), None on the others."""
    transformers.logging.disable_progress_bar()  # weight-loading bars; the training bar is ours
    p = plan(questions, config)
    ranks = distributed.start(cuda=p.device.type == "cuda")
    try:
        require(
            config.batch_size >= ranks.world,
            f"--batch-size {config.batch_size} is less than the {ranks.world} processes: each needs a question",
        )
        return _run(p, config, ranks)
    finally:
        ranks.close()


def _run(p: Plan, config: TrainConfig, ranks: Ranks) -> Outputs | None:
    encoder = load_encoder(config.encoder or p.manifest.encoder.spec)
    retrieval = Retrieval(p.index_dir, p.manifest, RetrievalMode.parse(config.retrieval))
    try:
        for shard in retrieval.shards:
            check_compatible(encoder, shard)
        if p.train_generator:
            lm = load_passage_lm(config.generator, Dtype.FLOAT32, Device(config.device), packed=False)  # it learns
            return _train(p, config, ranks, encoder, Learner(lm, lm.teacher_forced), retrieval)
        scorer: Scorer = OracleReader()
        if not config.oracle_reader:  # its log-likelihoods are constants of the loss: served precision is enough
            disk = Path(config.kv_cache_dir) if config.kv_cache_dir else None
            served = load_passage_lm(
                config.generator,
                Dtype.parse(config.generator_dtype),
                Device(config.device),
                kv_cache_bytes=auto_budget_bytes(p.device),  # questions on one paragraph share its passage's work
                kv_cache_dir=disk,
                kv_cache_disk_bytes=half_the_free_space(disk) if disk else 0,
            )
            scorer = GeneratorScorer(served, config.generator)
        if not ranks.main:
            ranks.wait()  # rank 0 creates the table
        table = LikelihoodTable(p.likelihoods, scorer, str(p.index))
        if ranks.main:
            ranks.wait()
        try:
            return _train(p, config, ranks, encoder, table, retrieval)
        finally:
            table.close()
    finally:
        retrieval.close()


@dataclass(frozen=True)
class Learner:
    """A generator that learns with the query encoder: p(y|x,z) teacher-forced with gradients at every step."""

    lm: PassageLM
    teacher_forced: Callable[..., torch.Tensor]  # lm.teacher_forced, through DDP when data-parallel

    def logprobs(self, examples: list[Example], passages: list[list[Passage]]) -> tuple[torch.Tensor, torch.Tensor]:
        targets, mask = rag_math.answer_targets(
            [self.lm.answer_token_ids(e.answers[0]) for e in examples], self.lm.rules.pad_token_id
        )
        return self.teacher_forced([e.question for e in examples], [one_each(f) for f in passages], targets), mask


# Where p(y_t|x,z,y<t) comes from: the learning generator, or the frozen one's (or the oracle's) likelihood table.
Likelihoods = Learner | LikelihoodTable


def _fingerprint(p: Plan, config: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    free = ("max_steps", "epochs", "progress", "dev", "out", "device", "checkpoint_every", "likelihoods", "patience",
            "kv_cache_dir")  # fmt: skip
    settings = {k: v for k, v in asdict(config).items() if k not in free}
    return {"questions_sha256": sha256_file(p.questions), "index": str(p.index), **settings}


def _train(
    p: Plan, config: TrainConfig, ranks: Ranks, encoder: Encoder, likelihoods: Likelihoods, retrieval: Retrieval
) -> Outputs | None:
    torch.manual_seed(config.seed)
    if config.encoder_lora_rank:
        with_question_adapter(encoder, config.encoder_lora_rank)  # only the adapter learns
    else:
        encoder.question_model.requires_grad_(p.train_encoder)
    torch.nn.Module.to(encoder.question_model, p.device)
    learner = likelihoods if isinstance(likelihoods, Learner) else None
    if learner is not None and config.lora_rank:
        import peft

        lora = peft.LoraConfig(
            r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules="all-linear", lora_dropout=0.0
        )
        learner.lm.model = peft.get_peft_model(learner.lm.model, lora)
    if learner is not None and not config.lora_rank:
        learner.lm.model.requires_grad_(True)
    models = {"encoder": encoder.question_model, **({"generator": learner.lm.model} if learner else {})}
    question_vectors = encoder.question_vectors
    if p.train_encoder:
        question_vectors = ranks.data_parallel(encoder.question_model, encoder.question_vectors)
    if learner is not None:
        likelihoods = learner = Learner(learner.lm, ranks.data_parallel(learner.lm.model, learner.lm.teacher_forced))
    parameters = [q for module in models.values() for q in module.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(p.examples) / config.batch_size)
    total = config.max_steps or per_epoch * config.epochs
    warmup = max(1, min(100, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    fingerprint = _fingerprint(p, config)
    if isinstance(likelihoods, LikelihoodTable):
        _score_candidates(p, config, ranks, encoder, likelihoods, retrieval)

    checkpoint = p.out / "checkpoint"
    run = Progress()
    if (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=True, map_location=p.device)
        saved = json.loads((checkpoint / "fingerprint.json").read_text())
        if saved != fingerprint:
            raise FailedPrecondition(
                f"{p.out} holds a run with other settings or questions; give another --out (or remove it)"
            )
        for name, module in models.items():
            _trainable_state(module, load=state["models"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        run = Progress.from_state(state["progress"])
        log.info("resuming %s at step %d", p.out, run.step)
    p.out.mkdir(parents=True, exist_ok=True)

    autocast: AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if p.device.type == "cuda" else nullcontext()
    )

    def loss_of(batch: list[Example]) -> torch.Tensor:
        """The negative marginal log-likelihood of each question's answer over its top k under the current encoder."""
        texts = [e.question for e in batch]
        with autocast:
            # One encoding of the questions: it retrieves (detached) and gives p(z|x) its gradient.
            if p.train_encoder:
                q = question_vectors(texts)
            else:
                q = torch.from_numpy(encoder.encode_questions(texts)).to(p.device)
            passages = retrieval.search(texts, q.detach().float().cpu().numpy(), config.k)
            prior = retrieval.log_prior(q, passages)
            logprobs, mask = likelihoods.logprobs(batch, passages)
            return rag_math.marginal_nll(logprobs.to(p.device).float(), mask, prior, p.mode)

    def held_out_loss() -> float:
        """The mean NLL over the held-out questions (each rank sums its share)."""
        mine, size = ranks.share(p.held_out), config.batch_size
        with torch.no_grad():
            summed = sum(float(loss_of(mine[i : i + size]).sum()) for i in range(0, len(mine), size))
        return ranks.total(summed) / len(p.held_out)

    def evaluate() -> None:
        """The held-out NLL now; the best state so far is kept (in memory and in the checkpoint)."""
        if not p.held_out:
            return
        if run.evaluate(held_out_loss()):
            run.best = {name: _copied(_trainable_state(module)) for name, module in models.items()}
        log.info("step %d: held-out marginal NLL %.4f (best %.4f at step %d)", run.step, run.evaluations[-1]["nll"],
                 run.best_nll, run.best_step)  # fmt: skip

    every = config.eval_every or per_epoch
    if not run.evaluations:
        evaluate()  # the untrained encoder's: training must beat it to be kept
    started = time.perf_counter()
    with tqdm(
        total=total, initial=run.step, desc="rag train", unit="step", disable=not config.progress, file=sys.stderr
    ) as bar:
        while run.step < total and not run.stopped_early:
            batch = _batch(p.examples, run.step, config.batch_size, config.seed)
            # The batch's mean loss, whatever each rank's share: DDP averages the ranks' gradients.
            loss = loss_of(ranks.share(batch)).sum() * ranks.world / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            run.step += 1
            run.losses.append(ranks.total(loss.detach()) / ranks.world)
            bar.update()
            bar.set_postfix(loss=f"{np.mean(run.losses[-20:]):.3f}")
            if run.step % every == 0 or run.step == total:
                evaluate()
                run.stopped_early = run.steps_since_best_evaluation(config.patience)
            if ranks.main and (run.step % config.checkpoint_every == 0 or run.step == total or run.stopped_early):
                _save_checkpoint(checkpoint, fingerprint, run, models, optimizer, schedule)
    log.info("trained %d steps in %.0f s on %s", run.step, time.perf_counter() - started, p.device)
    if run.best is not None:  # the checkpoint the held-out questions liked best, which may be the untrained one
        for name, module in models.items():
            _trainable_state(module, load=run.best[name])
        log.info("kept step %d's models (held-out marginal NLL %.4f)", run.best_step, run.best_nll)
    if not ranks.main:
        return None
    return _finish(p, config, encoder, learner, likelihoods, run)


def _batch(examples: list[Example], step: int, size: int, seed: int) -> list[Example]:
    """Step `step`'s questions: the next `size` of a stream that runs through the questions in a new seeded order
    each epoch (a batch may span two epochs, so every batch is whole)."""
    n = len(examples)
    positions = range(step * size, (step + 1) * size)
    orders = {
        e: torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)) for e in {i // n for i in positions}
    }
    return [examples[int(orders[i // n][i % n])] for i in positions]


@dataclass
class Progress:
    """Where a run stands: steps, losses, held-out evaluations and the best state by them."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)  # {"step", "nll"}
    best_step: int = 0
    best_nll: float = math.inf
    best: dict[str, dict[str, torch.Tensor]] | None = None  # per model, its learning weights at best_step
    stopped_early: bool = False

    def evaluate(self, nll: float) -> bool:
        """Record a held-out NLL; True when it is the best so far."""
        self.evaluations.append({"step": self.step, "nll": nll})
        if nll < self.best_nll:
            self.best_step, self.best_nll = self.step, nll
            return True
        return False

    def steps_since_best_evaluation(self, patience: int) -> bool:
        """Whether the last `patience` evaluations all failed to improve on the best."""
        return sum(e["step"] > self.best_step for e in self.evaluations) >= patience

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**state)

    def summary(self, questions: int) -> dict[str, Any] | None:
        if not self.evaluations:
            return None
        return {
            "questions": questions,
            "evaluations": self.evaluations,
            "best_step": self.best_step,
            "best_nll": self.best_nll,
            "stopped_early": self.stopped_early,
        }


def _copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in state.items()}


def _score_candidates(
    p: Plan, config: TrainConfig, ranks: Ranks, encoder: Encoder, table: LikelihoodTable, retrieval: Retrieval
) -> None:
    """Score every question's top `candidates` passages under the untrained encoder into the table (what it lacks,
    split among the ranks; an interrupted run resumes after the last pair committed). Training then mostly reads
    the table."""
    examples = p.examples + p.held_out
    pairs: list[Pair] = []
    for start in range(0, len(examples), 256):
        part = examples[start : start + 256]
        texts = [e.question for e in part]
        found = retrieval.search(texts, encoder.encode_questions(texts), p.candidates)
        pairs += [(e, passage) for e, passages in zip(part, found, strict=True) for passage in passages]
    missing = table.missing(pairs)
    if not missing:
        return
    log.info("scoring %d (question, passage) pairs into %s", len(missing), table.path)
    started = time.perf_counter()
    with tqdm(
        total=len(missing), desc="likelihood table", unit="pair", disable=not config.progress, file=sys.stderr
    ) as bar:
        table.fill(missing, progress=bar.update)
    log.info("scored %d pairs in %.0f s", len(missing), time.perf_counter() - started)


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
    run: Progress,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Everything a rerun resumes from, replaced atomically (a crash leaves the previous checkpoint)."""
    with publishing(checkpoint) as tmp:
        tmp.mkdir()
        state = {
            "progress": run.to_state(),
            "models": {name: _trainable_state(module) for name, module in models.items()},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2))


def _finish(
    p: Plan, config: TrainConfig, encoder: Encoder, learner: Learner | None, likelihoods: Likelihoods, run: Progress
) -> Outputs:
    """Write the models (LoRA merged), the loss curve and the summary; evaluate on --dev before and after."""
    losses = run.losses
    torch.nn.Module.to(encoder.question_model, "cpu")
    query_encoder = generator = None
    if p.train_encoder:
        query_encoder = p.out / "query_encoder"
        with publishing(query_encoder) as tmp:
            encoder.save_question_tower(tmp, p.manifest.encoder)
        query_encoder_spec = encoder.question_tower_spec(query_encoder)
    if learner is not None:
        if config.lora_rank:
            learner.lm.model = learner.lm.model.merge_and_unload()
        torch.nn.Module.to(learner.lm.model, "cpu")
        generator = p.out / "generator"
        with publishing(generator) as tmp:
            tmp.mkdir()
            save_passage_lm(learner.lm, config.generator, tmp)
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
        run.summary(len(p.held_out)),
        likelihoods.summary() if isinstance(likelihoods, LikelihoodTable) else None,
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
