"""The likelihood table of a frozen generator: log p(y_t|x,z,y<t) of each (question, answer, passage), scored
once and saved, so that training the query encoder against a frozen generator runs many cheap steps.

With the generator frozen, the only thing a training step needs from it is p(y|x,z) for the passages the current
query encoder retrieves; those do not change as the encoder learns, only *which* passages are retrieved does. The
table holds them in SQLite (one row per question, answer and passage; each committed as it is scored, so an
interrupted run loses nothing and a rerun resumes), filled up front for each question's top-N candidates and
lazily for any passage that enters a top-k later. A table records who scored it (the generator's weights by
content, its precision and prompt, or the oracle reader) and over which index; a run with other ones refuses it
rather than mixing scores (a generator moved or copied keeps its table; one changed in place does not).

Scores come through the serving path (`PassageLM.encode` and `rag_math.score_answers`: the shared prefix, length
buckets, the passage KV cache and the precision the generator serves in), so the table holds what the service
computes; they equal the training path's teacher forcing (tests/test_training.py).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from generator_svc import rag_math
from generator_svc.families import DecoderOnlyLM
from generator_svc.passage_lm import PassageLM
from generator_svc.precision import logits_precision
from rag.errors import FailedPrecondition
from rag.files import content_identity
from rag.types import Passage
from rag_cli.eval import Example, normalize_answer

# The oracle reader's log p(y|x,z): certain where the passage holds an answer, near impossible elsewhere.
ORACLE_HIT, ORACLE_MISS = 0.0, -10.0

Pair = tuple[Example, Passage]


class Scorer(Protocol):
    @property
    def identity(self) -> dict[str, str]:
        """What the scores depend on besides the question, answer and passage (a table keeps one scorer's)."""
        ...

    def score(self, pairs: Sequence[Pair]) -> list[np.ndarray]:
        """log p(y_t|x,z,y<t) of each pair's target answer (the example's first), one value per answer token."""
        ...

    def work(self) -> dict[str, int]:
        """What scoring has cost this process so far (passage segments run or read), for the run's summary."""
        ...


class GeneratorScorer:
    """A frozen generator's scores, through the path it serves with."""

    PASSAGES_PER_PASS = 16  # one question's passages encoded together: its rows share the question's tokens

    def __init__(self, lm: PassageLM, spec: str) -> None:
        self.lm = lm
        self.weights = content_identity(Path(spec))  # read once: hashing a model directory takes seconds

    @property
    def identity(self) -> dict[str, str]:
        lm = self.lm
        chat = lm.prompt if isinstance(lm, DecoderOnlyLM) else None  # BART/T5 read title / text // question
        prompt = {
            "max_passage_tokens": chat.max_passage_tokens if chat else None,
            "system": chat.system_prompt if chat else None,
            # the wording around the passage and question (a table scored under another is refused, not mixed)
            "layout": lm.input_text("QUESTION", (Passage("passage", "TITLE", "TEXT", 0.0),)),
        }
        return {
            "scorer": "generator",
            "generator": self.weights,
            "model": lm.name,
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            # a bfloat16 model's logits were bfloat16, then float32, then float32 near the top: its tables differ
            "logits_dtype": logits_precision(lm.model),
            "prompt": json.dumps(prompt, sort_keys=True),
        }

    def work(self) -> dict[str, int]:
        cache = self.lm.passage_cache if isinstance(self.lm, DecoderOnlyLM) else None  # BART/T5 have none
        return {f"passage_segments_{o}": cache.lookups[o] for o in ("miss", "hit", "disk")} if cache is not None else {}

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair]) -> list[np.ndarray]:
        """A question's passages as the rows of one request (as the generator serves it: the question's tokens run
        once for all of them, after each passage's cached segment)."""
        by_question: dict[tuple[str, str], list[int]] = {}
        for i, (example, _) in enumerate(pairs):
            by_question.setdefault((example.question, example.answers[0]), []).append(i)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(pairs)
        for indices in by_question.values():
            example = pairs[indices[0]][0]
            answer = self.lm.answer_token_ids(example.answers[0])
            for start in range(0, len(indices), self.PASSAGES_PER_PASS):
                part = indices[start : start + self.PASSAGES_PER_PASS]
                ctx = self.lm.encode([example.question], [[(pairs[i][1],) for i in part]])
                scores = rag_math.score_answers(self.lm, ctx, torch.zeros(1, len(part)), [0], [answer])
                for k, i in enumerate(part):
                    out[i] = scores.token_logprobs[0, k].float().numpy().copy()
        return out


class OracleReader:
    """A diagnostic, not the recipe: log p(y|x,z) := 0 when one of the question's answers occurs in the passage
    (SQuAD-normalised, on word boundaries), -10 otherwise. Training against it shows how far retrieval can move
    when the reader is perfect, without running a generator: the most the real recipe can gain."""

    identity = {"scorer": "oracle-reader"}

    def work(self) -> dict[str, int]:
        return {}

    def score(self, pairs: Sequence[Pair]) -> list[np.ndarray]:
        return [np.array([ORACLE_HIT if holds_answer(p, e.answers) else ORACLE_MISS], np.float32) for e, p in pairs]


def holds_answer(passage: Passage, answers: Sequence[str]) -> bool:
    text = f" {normalize_answer(passage.title + ' ' + passage.text)} "
    return any(f" {a} " in text for a in map(normalize_answer, answers) if a)


class LikelihoodTable:
    """log p(y_t|x,z,y<t) by (question, answer, passage id), saved in `path` and extended as pairs are asked for."""

    def __init__(self, path: Path, scorer: Scorer, index: str) -> None:
        self.path = path
        self.scorer = scorer
        self.identity = {**scorer.identity, "index": index}
        self.scored = 0  # pairs this process scored (the rest came from the table)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=600)  # data-parallel ranks write to it too
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS likelihood (question TEXT, answer TEXT, passage TEXT, logprobs BLOB,"
                " PRIMARY KEY (question, answer, passage))"
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (json.dumps(self.identity),))
            saved = json.loads(self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()[0])
            if saved != self.identity:
                differs = sorted(k for k in {**saved, **self.identity} if saved.get(k) != self.identity.get(k))
                raise FailedPrecondition(
                    f"{path} holds likelihoods scored with another {', '.join(differs)} "
                    f"({', '.join(f'{k}={saved.get(k)!r}' for k in differs)}); give another --likelihoods or --out"
                )
        self._known: dict[tuple[str, str, str], np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        """Read the whole table (what other processes wrote too): it is small next to the model, a few floats per
        pair, and every step looks pairs up."""
        for question, answer, passage, blob in self._db.execute("SELECT * FROM likelihood"):
            self._known[(question, answer, passage)] = np.frombuffer(blob, np.float32)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM likelihood").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _key(example: Example, passage: Passage) -> tuple[str, str, str]:
        return example.question, example.answers[0], passage.id

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "pairs": len(self),
            "scored_by_this_run": self.scored,
            **self.scorer.work(),
            **self.identity,
        }

    def missing(self, pairs: Sequence[Pair]) -> list[Pair]:
        """The pairs the table lacks, each once."""
        return list({self._key(e, p): (e, p) for e, p in pairs if self._key(e, p) not in self._known}.values())

    def fill(
        self, pairs: Sequence[Pair], per_commit: int = 64, progress: Callable[[int], object] | None = None
    ) -> None:
        """Score the pairs the table lacks, committing every `per_commit` (a rerun resumes after the last)."""
        missing = self.missing(pairs)
        for start in range(0, len(missing), per_commit):
            part = missing[start : start + per_commit]
            scored = {
                self._key(e, p): s.astype(np.float32) for (e, p), s in zip(part, self.scorer.score(part), strict=True)
            }
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO likelihood VALUES (?, ?, ?, ?)",
                    [(*key, values.tobytes()) for key, values in scored.items()],
                )
            self._known.update(scored)
            self.scored += len(part)
            if progress is not None:
                progress(len(part))

    def logprobs(
        self, examples: Sequence[Example], passages: Sequence[Sequence[Passage]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probabilities [B, K, T] of each example's answer under each of its passages, and the mask
        [B, T] of the answer's tokens (what rag_math.marginal_nll takes); pairs the table lacks are scored now."""
        self.fill([(e, p) for e, found in zip(examples, passages, strict=True) for p in found])
        rows = [[self._known[self._key(e, p)] for p in found] for e, found in zip(examples, passages, strict=True)]
        T = max(len(r) for row in rows for r in row)
        logprobs = torch.zeros(len(rows), len(rows[0]), T)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, row in enumerate(rows):
            for k, values in enumerate(row):
                logprobs[b, k, : len(values)] = torch.from_numpy(values.copy())
            mask[b, : len(row[0])] = True
        return logprobs, mask
