"""The machine this process runs on: its CPU (model and feature flags, which choose the precision and name every
latency figure), and what the process may use of it: the container's limits (cgroup v2, then v1), not the node's.

torch and FAISS size their thread pools by the cores they see, and a container sees all of the node's: on a 64-core
node a container limited to 2 CPUs would run 64 spinning OpenMP threads in 2 CPUs' worth of time slices, many times
slower than 2 threads. So a service's default thread count is read from its CPU limit where there is one."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's model name, as every latency figure must say ("unknown" where it cannot be read)."""
    return _cpuinfo("model name") or "unknown"


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo (Linux); empty where it cannot be read."""
    lines = _read(CPUINFO).splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), "")


def container_memory_limit() -> int | None:
    """The cgroup's memory limit in bytes (v2, then v1), or None where there is none or it cannot be read."""
    for path in (CGROUP / "memory.max", CGROUP / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's near-2**63 "unlimited"
            return int(text)
    return None


def container_cpu_limit() -> float | None:
    """The cgroup's CPU limit in CPUs (v2 `cpu.max`, then v1's CFS quota over its period), or None where there is
    none or it cannot be read."""
    quota_period = _read(CGROUP / "cpu.max").split()
    if len(quota_period) != 2:
        for v1 in (CGROUP / "cpu", CGROUP / "cpu,cpuacct"):
            quota_period = [_read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")]
            if all(quota_period):
                break
    try:
        quota, period = (int(n) for n in quota_period)
    except ValueError:  # "max" (v2), unreadable or missing
        return None
    return quota / period if quota > 0 and period > 0 else None  # v1's quota is -1 without a limit


@dataclass(frozen=True)
class Threads:
    """How many compute threads a service runs, and why: `basis` a fixed label (the metric's), `reason` in words."""

    count: int
    basis: str  # asked | cpu_limit | cores
    reason: str


def compute_threads(asked: int = 0) -> Threads:
    """`asked` (--threads) where given, then OpenMP's own OMP_NUM_THREADS (torchrun sets it per process); else the
    container's CPU limit, rounded up, where it is below the cores this process may run on; else one per such core."""
    if asked > 0:
        return Threads(asked, "asked", f"--threads {asked}")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return Threads(int(omp), "asked", f"OMP_NUM_THREADS={omp}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = container_cpu_limit()
    if limit is not None and math.ceil(limit) < cores:
        return Threads(math.ceil(limit), "cpu_limit", f"the container's CPU limit, {limit:g} of {cores} cores")
    return Threads(cores, "cores", f"one per core this process may run on ({cores})")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
