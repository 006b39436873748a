"""Prometheus metrics of the services. Labels never carry user text or ids.

Every metric is in prometheus_client's default registry (in-process tests and benchmarks read it there); each
service's /metrics serves its own families only (COMMON plus RETRIEVER, GENERATOR or GATEWAY), so that a
dashboard never reads another service's metric at 0.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)

REQUESTS = Counter("rag_requests_total", "RPCs handled, by full method name and status code.", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "rag_request_duration_seconds", "RPC latency as the server sees it.", ["method"], buckets=_LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "rag_stage_duration_seconds",
    "Latency per pipeline stage: encode and search (retriever), generate and score (generator), "
    "retrieve, generate_call and end_to_end (gateway).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_THREADS = Gauge(
    "rag_compute_threads",
    "Threads the service's model and index work runs on (torch, FAISS), and their basis: asked (--threads), "
    "cpu_limit (the container's CPU limit, rounded up) or cores (one per core the process may run on).",
    ["basis"],
)
SEARCH_SECONDS = Histogram(
    "rag_search_duration_seconds",
    "Retriever time per Search request (encoding and search), by retrieval mode: dense, lexical or hybrid.",
    ["retrieval"],
    buckets=_LATENCY_BUCKETS,
)
INDEX_INFO = Gauge("rag_index_info", "1 for the index version a retriever serves.", ["name", "version"])
INDEX_LOAD_FAILURES = Counter(
    "rag_index_load_failures_total", "Index versions a retriever refused to load, by reason.", ["reason"]
)
INDEX_SWAPS = Counter("rag_index_swaps_total", "Index swaps driven by the gateway, by outcome.", ["outcome"])
INDEX_SWAP_SECONDS = Histogram(
    "rag_index_swap_duration_seconds",
    "Time of a whole swap (load everywhere, then activate), by outcome.",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
INDEX_ACTIVATION_SECONDS = Histogram(
    "rag_index_activation_seconds", "Time to activate a loaded version on every retriever.", buckets=_LATENCY_BUCKETS
)
ASKS_SHED = Counter("rag_gateway_asks_shed_total", "Asks refused before any work because the gateway was full.")
ADMIN_AUTH_FAILURES = Counter(
    "rag_admin_auth_failures_total",
    "Admin calls refused for a missing or wrong token, by outcome: refused (UNAUTHENTICATED, logged) or throttled "
    "(beyond the per-host or overall limit: RESOURCE_EXHAUSTED, not logged one by one).",
    ["outcome"],
)
PASSAGES_SERVED = Counter("rag_passages_served_total", "Passages returned by the retriever.")
GENERATOR_QUEUE = Gauge("rag_generator_queue_depth", "Generate/Score requests waiting for or using the model.")
GENERATOR_BATCH_SIZE = Histogram(
    "rag_generator_batch_size",
    "Generate requests decoded together: per decoding pass where requests join each other's (decoder-only), per "
    "batch otherwise.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
GENERATOR_JOINED = Counter(
    "rag_generator_joined_requests_total",
    "Requests admitted while others were being decoded, joining their passes at a step boundary.",
)
GENERATED_TOKENS = Counter("rag_generated_tokens_total", "Tokens in returned hypotheses.")
GENERATOR_PRECISION = Gauge(
    "rag_generator_precision_info",
    "1 for the dtype the generator's weights are served in, and its basis: asked (--dtype), native_bfloat16 or "
    "no_native_bfloat16 (--dtype auto, by the GPU or the CPU's flags).",
    ["dtype", "basis"],
)
MODEL_TOKENS = Counter(
    "rag_generator_model_tokens_total",
    "Token positions run through the model outside decoding steps, padding included, by pass: prompt (decoder-only "
    "prompts, encoder inputs) and scored (teacher-forced answers).",
    ["pass"],
)
KV_CACHE_LOOKUPS = Counter(
    "rag_generator_kv_cache_lookups_total",
    "Passage segments looked up in the passage KV cache, by outcome (hit: in memory, disk: read from the disk "
    "tier, miss: run).",
    ["outcome"],
)
KV_CACHE_BYTES = Gauge("rag_generator_kv_cache_bytes", "Bytes of keys and values the passage KV cache holds.")
KV_CACHE_DISK_BYTES = Gauge(
    "rag_generator_kv_cache_disk_bytes", "Bytes of keys and values the passage KV cache's disk tier holds."
)
KV_CACHE_EVICTIONS = Counter(
    "rag_generator_kv_cache_evictions_total", "Passage segments evicted from the KV cache to stay within its budget."
)
KV_CACHE_FALLBACKS = Counter(
    "rag_generator_kv_cache_fallbacks_total",
    "Requests encoded without the passage KV cache because a prompt's tokens did not split at the passage "
    "segment's (the tokenizer merged across the boundary).",
)
DRAFT_ACCEPTED = Histogram(
    "rag_generator_draft_accepted_tokens",
    "Drafted tokens accepted per verification pass of greedy RAG-Token (each pass also yields one token of its own).",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
)
DRAFT_TOKENS = Gauge(
    "rag_generator_draft_tokens",
    "Drafted tokens greedy search verifies per pass (--draft-tokens, or what the warm-up measured to be fastest).",
)
HYPOTHESES_RULED_OUT = Counter(
    "rag_generator_hypotheses_ruled_out_total",
    "Greedy thorough RAG-Sequence hypotheses stopped before their end: no answer starting with them could rank "
    "among those returned.",
)
DECODES_STOPPED = Counter(
    "rag_generator_decodes_stopped_total",
    "Requests whose model work stopped between two passes (prompt chunks, decoding steps, scoring chunks) because "
    "every caller went away.",
)
REQUESTS_DROPPED = Counter(
    "rag_generator_requests_dropped_total",
    "Requests taken from the queue with no model work done, nobody waiting for them any more: their caller went "
    "away (cancelled), or their deadline passed (deadline).",
    ["reason"],
)


COMMON: tuple[Collector, ...] = (
    REQUESTS, REQUEST_SECONDS, STAGE_SECONDS, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR
)  # fmt: skip
RETRIEVER: tuple[Collector, ...] = (
    SEARCH_SECONDS, INDEX_INFO, COMPUTE_THREADS, INDEX_LOAD_FAILURES, PASSAGES_SERVED, ADMIN_AUTH_FAILURES
)  # fmt: skip
GENERATOR: tuple[Collector, ...] = (
    GENERATOR_QUEUE, GENERATOR_BATCH_SIZE, GENERATOR_JOINED, GENERATED_TOKENS, MODEL_TOKENS, DECODES_STOPPED, REQUESTS_DROPPED, GENERATOR_PRECISION, COMPUTE_THREADS,
    KV_CACHE_LOOKUPS, KV_CACHE_BYTES, KV_CACHE_DISK_BYTES, KV_CACHE_EVICTIONS, KV_CACHE_FALLBACKS, DRAFT_ACCEPTED, DRAFT_TOKENS,
    HYPOTHESES_RULED_OUT,
)  # fmt: skip
GATEWAY: tuple[Collector, ...] = (
    INDEX_SWAPS, INDEX_SWAP_SECONDS, INDEX_ACTIVATION_SECONDS, ASKS_SHED, ADMIN_AUTH_FAILURES
)  # fmt: skip


@contextmanager
def timed(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage).observe(time.perf_counter() - start)


def serve_metrics(
    host: str, port: int, ready: Callable[[], bool] = lambda: True, families: tuple[Collector, ...] = ()
) -> int:
    """Serve over plain HTTP on a daemon thread: /metrics (Prometheus: COMMON and `families`), /readyz (200
    while the service is SERVING, else 503) and /livez (200: the process answers). The last two are for probes
    that cannot speak TLS or gRPC (the kubelet's gRPC probe has no TLS). Returns the bound port (0 picks a free
    one)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in dict.fromkeys(COMMON + families):
        registry.register(collector)
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/readyz", "/livez"):
            ok = path == "/livez" or ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not serving\n"]
        return prometheus(environ, start_response)

    server = make_server(host, port, app, _BoundedServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return int(server.server_port)


MAX_METRICS_CONNECTIONS = 16  # scrapes and probes come a few at a time
METRICS_READ_TIMEOUT_SECONDS = 5.0


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, as many as MAX_METRICS_CONNECTIONS at once (more are closed at once): 500
    half-open connections used to hold 500 threads."""

    request_queue_size = 64  # connections waiting to be accepted (socketserver's default is 5)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for a connection that timed out or went away (socketserver prints a traceback for each)."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_READ_TIMEOUT_SECONDS  # a connection that sends nothing is dropped, freeing its thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # probes every few seconds are not news
