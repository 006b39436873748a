"""`rag index build --kv-cache DIR`: every passage of the new version run through a generator's passage KV cache
into its disk tier, so the generators serving it (`--kv-cache-dir DIR`) never run a passage's prompt work when a
request comes: a cold generator answers like a warm one.

Entries are named by what computed them (the generator's weights, precision, template, device kind and torch
version): fill with the generator and precision that will serve, on the same kind of device. Entries are kept by
content, so a new version's unchanged passages are already there and only the changed ones run. Sizes: about 12
KiB a token for the demo model in bfloat16 (1.3-2.2 MB a passage), so about 15-20 GB for the demo's 10,033
Wikipedia leads; the disk tier keeps to half the free space, least recently read out first.
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from generator_svc.config import Device
from generator_svc.families import DecoderOnlyLM
from generator_svc.loading import load_passage_lm
from generator_svc.passage_cache import half_the_free_space
from generator_svc.precision import Dtype
from rag.errors import FailedPrecondition
from rag.types import Passage
from retriever_svc.layout import PASSAGES, Manifest, shard_dir

PASSAGES_PER_PASS = 32
MEMORY_BYTES = 2**28  # the memory tier only carries a pass's segments to the disk


def fill_kv_cache(
    version_dir: Path, manifest: Manifest, directory: Path, generator: str, dtype: str, progress: bool
) -> tuple[int, int]:
    """Run the passage segments of every shard the disk tier in `directory` lacks; (how many ran, how many were
    there already)."""
    lm = load_passage_lm(
        generator,
        Dtype.parse(dtype),
        Device.AUTO,
        kv_cache_bytes=MEMORY_BYTES,
        kv_cache_dir=directory,
        kv_cache_disk_bytes=half_the_free_space(directory),
    )
    if not isinstance(lm, DecoderOnlyLM):
        raise FailedPrecondition(
            f"--kv-cache: {generator} is an encoder-decoder model; only decoder-only ones keep one"
        )
    ran = there = 0
    with tqdm(
        total=manifest.count, desc="passage KV cache", unit="passage", disable=not progress, file=sys.stderr
    ) as bar:
        for shard in range(manifest.num_shards):
            with closing(sqlite3.connect(f"file:{version_dir / shard_dir(shard) / PASSAGES}?mode=ro", uri=True)) as db:
                rows = db.execute("SELECT id, title, text FROM passages ORDER BY row")
                while batch := [Passage(*row) for row in rows.fetchmany(PASSAGES_PER_PASS)]:
                    with torch.inference_mode():
                        done = lm.cache_passages(batch)
                    ran, there = ran + done[0], there + done[1]
                    bar.update(len(batch))
    return ran, there
