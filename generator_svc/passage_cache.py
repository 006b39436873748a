"""An exact cache of passage segments' keys and values, for decoder-only generators.

A decoder-only row is `[fixed prefix][passage segment][question and the template's end]`: the system turn, the
template's start and the instruction, then `Passage: title / text / Question:`, then the question. Causal attention
and absolute (rotary) positions make a segment's keys and values a function of the fixed prefix and the segment's own
tokens only, so they can be computed once and reused by every request that reads the passage, exactly (Prompt
Cache, Gim et al. 2023; vLLM's automatic prefix caching; RAGCache, Jin et al. 2024). Only the question's tokens
then run per request.

Entries are keyed by content: the model, its precision and template (the namespace), and the segment's token ids,
fixed prefix included. The cache holds at most `budget_bytes`, least recently used out first.

Below it, optionally, a disk tier (`--kv-cache-dir`): every segment run is also written there, one safetensors
file per entry, so a restarted process, or another replica sharing the volume, reads segments instead of running
them (a read is milliseconds; running a passage on a CPU is a tenth of a second or more). Its namespace adds the
weights' content, the device kind and torch's version: a file is only read by the code, weights and kind of device
that would compute it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch

from generator_svc.context_attention import KV
from rag import host, metrics
from rag.errors import FailedPrecondition
from rag.files import publishing

log = logging.getLogger(__name__)


def auto_budget_bytes(device: torch.device) -> int:
    """A tenth of the device's memory (on a CPU, the RAM this process may use: the container's limit where there
    is one, not the node's), at most 4 GiB."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), host.container_memory_limit() or 2**63)
    return int(min(total // 10, 4 * 2**30))


def half_the_free_space(directory: Path) -> int:
    _make_writable(directory)
    return shutil.disk_usage(directory).free // 2


def _make_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as error:
        raise FailedPrecondition(
            f"--kv-cache-dir {directory}: {error}; give a directory this process may write, or none"
        ) from error


def _size(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class DiskTier:
    """Segment keys and values as files `<key>.safetensors` under `directory`/<namespace hash>, within a budget,
    least recently read (file modification time) out first. Each file is written whole under a temporary name and
    renamed, so readers (other replicas too) see a whole entry or none; a file that does not read back as one is
    removed and counts as a miss."""

    def __init__(self, directory: Path, budget_bytes: int, namespace: str, device: torch.device) -> None:
        self.directory = directory / hashlib.sha256(namespace.encode()).hexdigest()[:16]
        _make_writable(self.directory)
        self.budget_bytes = budget_bytes
        self.device = device
        for torn in self.directory.glob(".*.tmp"):  # a write killed midway, an hour ago or more (not one in flight)
            try:
                if time.time() - torn.stat().st_mtime > 3600:
                    torn.unlink()
            except FileNotFoundError:
                pass
        found = []
        for file in self.directory.glob("*.safetensors"):
            try:
                stat = file.stat()
            except FileNotFoundError:  # another replica evicted it
                continue
            found.append((stat.st_mtime, file.name, stat.st_size))
        self._files: OrderedDict[str, int] = OrderedDict((name, size) for _, name, size in sorted(found))
        self._bytes = sum(self._files.values())
        self._lock = threading.Lock()
        metrics.KV_CACHE_DISK_BYTES.set(self._bytes)

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}.safetensors"

    def holds(self, key: bytes) -> bool:
        return self._path(key).exists()

    def get(self, key: bytes) -> KV | None:
        path = self._path(key)
        try:
            tensors = safetensors.torch.load_file(path, device=str(self.device))
            kv = [(tensors[f"k{i}"], tensors[f"v{i}"]) for i in range(len(tensors) // 2)]
            if not kv or len(tensors) % 2:
                raise ValueError(f"{len(tensors)} tensors, not keys and values of each layer")
            os.utime(path)  # recently used: the last to go
        except FileNotFoundError:  # never written, or evicted by another replica
            self._forget(path.name)
            return None
        except Exception as error:  # noqa: BLE001 - a torn or foreign file is a miss, never a failed request
            log.warning("passage KV cache: removing %s, which does not read as an entry (%s)", path, error)
            self._forget(path.name)
            path.unlink(missing_ok=True)
            return None
        with self._lock:
            if path.name in self._files:
                self._files.move_to_end(path.name)
        return kv

    def put(self, key: bytes, kv: KV) -> None:
        path, size = self._path(key), _size(kv)
        if size > self.budget_bytes or path.name in self._files:
            return
        tensors = {}
        for i, (k, v) in enumerate(kv):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
        try:
            with publishing(path) as tmp:
                safetensors.torch.save_file(tensors, tmp)
                size = tmp.stat().st_size  # the budget counts files as a restart finds them
        except OSError as error:  # a full or read-only volume: serve on from memory
            log.warning("passage KV cache: cannot write to the disk tier (%s)", error)
            return
        with self._lock:
            self._files[path.name] = size
            self._bytes += size
            while self._bytes > self.budget_bytes:
                name, evicted = self._files.popitem(last=False)
                self._bytes -= evicted
                (self.directory / name).unlink(missing_ok=True)
            metrics.KV_CACHE_DISK_BYTES.set(self._bytes)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._bytes -= self._files.pop(name, 0)
            metrics.KV_CACHE_DISK_BYTES.set(self._bytes)

    def __len__(self) -> int:
        return len(self._files)


class PassageKVCache:
    """Least-recently-used segment keys and values ([1, kv_heads, length, head_dim] per layer) within a budget,
    over an optional disk tier."""

    def __init__(self, budget_bytes: int, namespace: str, disk: DiskTier | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.namespace = namespace.encode()
        self.disk = disk
        self.lookups: Counter[str] = Counter()  # by outcome, as rag_generator_kv_cache_lookups_total (this cache's)
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
        if entry is not None:
            self._count("hit")
            return entry[0]
        kv = self.disk.get(key) if self.disk is not None else None
        self._count("disk" if kv is not None else "miss")
        if kv is not None:
            self._remember(key, kv)
        return kv

    def holds(self, key: bytes) -> bool:
        """Whether the entry is here, in memory or on disk (not read, not counted as a lookup)."""
        with self._lock:
            if key in self._entries:
                return True
        return self.disk is not None and self.disk.holds(key)

    def _count(self, outcome: str) -> None:
        self.lookups[outcome] += 1
        metrics.KV_CACHE_LOOKUPS.labels(outcome).inc()

    def put(self, key: bytes, kv: KV) -> None:
        """Keep a segment that was run: in memory, and on disk where there is a tier."""
        self._remember(key, kv)
        if self.disk is not None:
            self.disk.put(key, kv)

    def _remember(self, key: bytes, kv: KV) -> None:
        size = _size(kv)
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
