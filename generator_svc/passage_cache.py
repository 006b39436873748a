"""An exact cache of passage segments' keys and values, for decoder-only generators.

A decoder-only row is `[fixed prefix][passage segment][question and the template's end]`: the system turn and the
template's start, then `Passage: title / text / instruction / Question:`, then the question. Causal attention and
absolute (rotary) positions make a segment's keys and values a function of the fixed prefix and the segment's own
tokens only, so they can be computed once and reused by every request that reads the passage, exactly (Prompt
Cache, Gim et al. 2023; vLLM's automatic prefix caching; RAGCache, Jin et al. 2024). Only the question's tokens
then run per request.

Entries are keyed by content: the model, its precision and template (the namespace), and the segment's token ids,
fixed prefix included. The cache holds at most `budget_bytes`, least recently used out first.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from generator_svc.context_attention import KV
from rag import metrics


def auto_budget_bytes(device: torch.device) -> int:
    """A tenth of the device's memory (on a CPU, the RAM this process may use: the container's limit where there
    is one, not the node's), at most 4 GiB."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), container_memory_limit() or 2**63)
    return int(min(total // 10, 4 * 2**30))


def container_memory_limit() -> int | None:
    """The cgroup's memory limit in bytes (v2, then v1), or None where there is none or it cannot be read."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's near-2**63 "unlimited"
            return int(text)
    return None


class PassageKVCache:
    """Least-recently-used segment keys and values ([1, kv_heads, length, head_dim] per layer) within a budget."""

    def __init__(self, budget_bytes: int, namespace: str) -> None:
        self.budget_bytes = budget_bytes
        self.namespace = namespace.encode()
        self._entries: OrderedDict[bytes, tuple[KV, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the model thread uses it; /metrics reads the sizes

    def key(self, token_ids: Sequence[int], start: int) -> bytes:
        """The key of the keys and values of token_ids[start:] computed after token_ids[:start]: the same segment
        after a shorter fixed prefix (a request whose template merged a token into one passage's) is another
        entry, of another length."""
        digest = hashlib.sha256(self.namespace)
        digest.update(f"\0{start}\0".encode() + b",".join(str(t).encode() for t in token_ids))
        return digest.digest()

    def get(self, key: bytes) -> KV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        metrics.KV_CACHE_LOOKUPS.labels("hit" if entry is not None else "miss").inc()
        return None if entry is None else entry[0]

    def put(self, key: bytes, kv: KV) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.budget_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            while self._bytes + size > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                metrics.KV_CACHE_EVICTIONS.inc()
            self._entries[key] = (kv, size)
            self._bytes += size
            metrics.KV_CACHE_BYTES.set(self._bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        metrics.KV_CACHE_BYTES.set(0)

    def __len__(self) -> int:
        return len(self._entries)
