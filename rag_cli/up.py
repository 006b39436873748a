"""`rag up`: the three services as child processes on loopback, started together and stopped together.

Each service runs as its own `rag serve` process, as it would in a cluster. The retriever and generator
start first (their models load in parallel), the gateway is pointed at them, and the stack is ready when
all three report SERVING on grpc.health.v1. A service that dies, or hangs (it stops answering its health check,
as a Kubernetes liveness probe would see), is started again on its address, with backoff. SIGINT/SIGTERM drains
the gateway first, then the others.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from rag import paths
from rag.clients import health, is_serving
from rag.config import flag_name, option
from rag.errors import FailedPrecondition

log = logging.getLogger(__name__)
LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class UpConfig:
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    index: str = option(paths.DEMO_INDEX, "NAME[@VERSION] to serve")
    encoder: str = option("", "question encoder spec; default: the encoder recorded in the index")
    generator: str = option(paths.demo_generator_spec(), "generator model directory, RAG checkpoint or .gguf file")
    dtype: str = option("auto", "generator weights precision: auto (bfloat16 where native), float32, bfloat16 or int8")
    kv_cache_dir: str = option(
        "", "the generator's passage KV cache on disk: segments kept across restarts (empty: memory only)"
    )
    host: str = option("127.0.0.1", "address every service listens on")
    port: int = option(50051, "gateway port (0 picks a free one)")
    shards: int = option(1, "retrievers to start, one per shard of the index")
    retrieval: str = option(
        "hybrid",
        "dense, lexical or hybrid: the retrievers' mode for Asks that name none (dense where the index has "
        "no lexical index)",
    )
    retriever_port: int = option(50052, "port of shard 0's retriever; shard i listens 100*i above (0 picks free ones)")
    generator_port: int = option(50053, "generator port (0 picks a free one)")
    metrics_port: int = option(9090, "gateway metrics port; generator +1, retrievers +2 and up; 0 turns metrics off")
    startup_timeout: float = option(900.0, "seconds to wait for every service to report SERVING")
    grace_seconds: float = option(10.0, "drain time of each service on shutdown")

    @classmethod
    def on_free_ports(cls, **fields: Any) -> UpConfig:
        """A stack on free loopback ports with metrics off: the demo, rag train --dev and the benchmarks."""
        return cls(**{"port": 0, "retriever_port": 0, "generator_port": 0, "metrics_port": 0, **fields})


@dataclass
class Child:
    """One `rag serve SERVICE` process; `address` is known once it has said where it listens."""

    name: str
    process: subprocess.Popen[str]
    flags: dict[str, object]
    address: str = ""
    started_at: float = 0.0
    restarts: int = 0  # consecutive quick crashes, for the backoff
    restart_at: float | None = None  # when a crashed child is due to be started again
    answered: bool = False  # it has answered a health check since it started: from then on, it must keep to
    unanswered: int = 0  # health checks in a row it did not answer
    next_probe: float = 0.0

    def __post_init__(self) -> None:
        self.started_at = time.monotonic()
        self._listening = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.address = f"{match.group(1)}:{match.group(2)}"
                self._listening.set()

    def learn_address(self, timeout: float) -> str:
        """Wait for the child's `listening on HOST:PORT` line (its port may have been 0)."""
        if not self._listening.wait(timeout) or not self.address:
            raise FailedPrecondition(f"{self.name} did not start listening (exit code {self.process.poll()})")
        return self.address

    def restart_delay(self) -> float:
        """Exponential backoff over quick crashes (1 s doubling to 30 s), reset once a child ran for a minute."""
        if time.monotonic() - self.started_at > STABLE_SECONDS:
            self.restarts = 0
        self.restarts += 1
        return float(min(MAX_BACKOFF_SECONDS, 2 ** (self.restarts - 1)))

    def respawned(self) -> Child:
        """The same service started again on the same address, so that whoever calls it reconnects."""
        port = int(self.address.rpartition(":")[2]) if self.address else self.flags.get("port", 0)
        child = spawn(self.name, {**self.flags, "port": port})
        child.restarts = self.restarts
        return child


STABLE_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0
# Liveness, as Kubernetes probes it: every 5 s, 2 s to answer, killed after 3 unanswered checks in a row. A
# busy service still answers: health is served by its event loop, the model and index work by other threads.
PROBE_SECONDS, PROBE_TIMEOUT_SECONDS, PROBE_FAILURES = 5.0, 2.0, 3


def spawn(service: str, flags: dict[str, object], env: dict[str, str] | None = None) -> Child:
    """Start `rag serve SERVICE --flag value ...` as a child process (its stdout read for its address)."""
    command = [sys.executable, "-m", "rag_cli", "serve", service]
    for key, value in flags.items():
        command += [flag_name(key), str(value)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env or os.environ.copy())
    return Child(service, process, flags)


class Stack:
    def __init__(self, config: UpConfig, generator_flags: dict[str, object] | None = None) -> None:
        self.config = config
        self.generator_flags = generator_flags or {}  # beyond UpConfig's (the latency bench's limits and metrics)
        self.children: list[Child] = []

    def _spawn(self, service: str, port: int, metrics_offset: int, **flags: object) -> Child:
        config = self.config
        metrics_port = config.metrics_port + metrics_offset if config.metrics_port else 0
        common = {
            "host": config.host,
            "port": port,
            "metrics_port": metrics_port,
            "grace_seconds": config.grace_seconds,
        }
        child = spawn(service, {**common, **flags})  # flags may replace a common one (a metrics port)
        self.children.append(child)
        return child

    def start(self) -> str:
        """Start all three; returns the gateway address once every service is SERVING."""
        c = self.config
        generator = self._spawn(
            "generator",
            c.generator_port,
            1,
            **{"generator": c.generator, "dtype": c.dtype, "kv_cache_dir": c.kv_cache_dir, **self.generator_flags},
        )
        retrievers = [
            self._spawn(
                "retriever",
                c.retriever_port + 100 * shard if c.retriever_port else 0,
                2 + shard,
                index_root=c.index_root,
                index=c.index,
                encoder=c.encoder,
                shard=shard,
                retrieval=c.retrieval,
            )  # fmt: skip
            for shard in range(c.shards)
        ]
        for child in (generator, *retrievers):
            child.learn_address(120)
        gateway = self._spawn(
            "gateway",
            c.port,
            0,
            retrievers=",".join(r.address for r in retrievers),
            generator_address=generator.address,
        )
        gateway.learn_address(120)
        deadline = time.monotonic() + c.startup_timeout
        waiting = list(self.children)
        while waiting:
            for child in list(waiting):
                if child.process.poll() is not None:
                    raise FailedPrecondition(
                        f"{child.name} exited with code {child.process.returncode}; see its log above"
                    )
                if is_serving(child.address):
                    waiting.remove(child)
            if waiting and time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"{', '.join(ch.name for ch in waiting)} not SERVING after {c.startup_timeout:.0f}s"
                )
            time.sleep(0.5)
        return gateway.address

    def wait(self, stop: threading.Event) -> int:
        """Serve until `stop` is set, restarting a service that dies (on its address, with backoff), as a
        Kubernetes Deployment would; returns the exit status for `rag up`."""
        while not stop.wait(0.5):
            for i, child in enumerate(self.children):
                if child.process.poll() is None:
                    self._probe(child)
                    continue
                now = time.monotonic()
                if child.restart_at is None:
                    delay = child.restart_delay()
                    child.restart_at = now + delay
                    log.error(
                        "%s (%s) exited with code %s; restarting it in %.0fs (restart %d in a row)",
                        child.name, child.address, child.process.returncode, delay, child.restarts,
                    )  # fmt: skip
                elif now >= child.restart_at:
                    self.children[i] = child.respawned()
                    log.info("%s restarted (pid %d)", child.name, self.children[i].process.pid)
        return 0

    def _probe(self, child: Child) -> None:
        """Kill a child that has stopped answering its health check (hung, or stopped with SIGSTOP): the loop
        then restarts it like one that exited."""
        now = time.monotonic()
        if now < child.next_probe or not child.address:
            return
        child.next_probe = now + PROBE_SECONDS
        if health(child.address, PROBE_TIMEOUT_SECONDS) is not None:
            child.answered, child.unanswered = True, 0
            return
        if not child.answered:
            return  # still starting
        child.unanswered += 1
        if child.unanswered >= PROBE_FAILURES:
            log.error(
                "%s (%s, pid %d) did not answer %d health checks in a row (hung?); killing it",
                child.name, child.address, child.process.pid, child.unanswered,
            )  # fmt: skip
            child.process.kill()

    def stop(self) -> None:
        """Drain the gateway first (no new work reaches the others), then the rest."""
        for group in (["gateway"], ["retriever", "generator"]):
            members = [c for c in self.children if c.name in group and c.process.poll() is None]
            for child in members:
                child.process.send_signal(signal.SIGTERM)
            for child in members:
                try:
                    child.process.wait(self.config.grace_seconds + 10)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()


def run_up(config: UpConfig) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(config)
    try:
        address = stack.start()
        retrievers = ",".join(c.address for c in stack.children if c.name == "retriever")
        generator = next(c.address for c in stack.children if c.name == "generator")
        print(f"ready: gateway on {address}; retrievers {retrievers}; generator {generator}", flush=True)
        return stack.wait(stop)
    finally:
        stack.stop()
