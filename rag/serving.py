"""The gRPC server scaffolding every service shares.

- `ServerConfig`: listen address, limits and drain time, each a flag with an env mirror (rag.config);
- `new_server`: a grpc.aio server with the status interceptor, message-size limits, keepalive, bounded
  concurrency, grpc.health.v1 (NOT_SERVING until the service says it is ready) and server reflection;
- `StatusInterceptor`: the one place domain errors become gRPC statuses, and where request metrics are taken;
- `run_forever`: serve until SIGINT/SIGTERM, then report NOT_SERVING, drain for `grace_seconds` and stop;
- `ServerThread`: host services on a background event loop (tests, benchmarks, in-process use).
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from rag import metrics
from rag.config import option
from rag.errors import InvalidArgument, RagError
from rag.host import Threads, compute_threads
from rag.tls import ServerTLS

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 inside containers)")
    port: int = option(0, "gRPC port (0 picks a free one)")
    metrics_port: int = option(9090, "Prometheus /metrics HTTP port; 0 turns metrics off")
    max_concurrent_rpcs: int = option(64, "RPCs in flight before new ones get RESOURCE_EXHAUSTED")
    max_message_mb: int = option(16, "largest request or response, in MiB")
    grace_seconds: float = option(10.0, "on SIGTERM, how long in-flight RPCs may take to finish")
    tls_cert: str = option("", "server certificate (PEM); with --tls-key: serve TLS (reread when it changes)")
    tls_key: str = option("", "private key (PEM) of --tls-cert")
    tls_client_ca: str = option("", "CA (PEM) that client certificates must chain to; set: require them (mTLS)")
    max_connection_age_seconds: float = option(
        300.0, "close client connections after this long (they reconnect, and spread over replicas added since)"
    )


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps RagError to its status code, anything else to INTERNAL (logged: it is a bug), and counts RPCs; for
    unary and server-streaming RPCs alike."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/rag."):
            return handler
        # Requests arrive as bytes and are parsed inside `_statuses`, so that one that is not valid protobuf
        # (or not UTF-8 where a string is) gets INVALID_ARGUMENT and is counted, not UNKNOWN with a traceback.
        parse = handler.request_deserializer or (lambda raw: raw)
        codec = {"response_serializer": handler.response_serializer}
        dispatched = _count_if_never_dispatched(method)
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary  # on an aio server, a coroutine function

            async def unary_behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                dispatched.set()
                async with _statuses(method, context):
                    return await unary(_parsed(parse, raw, method), context)
                return None  # an error was turned into a status

            return grpc.unary_unary_rpc_method_handler(unary_behavior, **codec)
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream  # an async generator function

            async def stream_behavior(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                dispatched.set()
                async with _statuses(method, context):
                    async for reply in stream(_parsed(parse, raw, method), context):
                        yield reply

            return grpc.unary_stream_rpc_method_handler(stream_behavior, **codec)
        return handler


def _count_if_never_dispatched(method: str) -> threading.Event:
    """A flag the handler sets when it starts. A call cancelled (or past its deadline) before that, while its
    request was still being received (a busy event loop), never reaches the handler: it is counted as CANCELLED
    when the call's task ends, so that rag_requests_total counts every call the server took."""
    dispatched = threading.Event()
    task = asyncio.current_task()  # the call's own task: interceptors run inside it
    if task is not None:
        task.add_done_callback(
            lambda _: None if dispatched.is_set() else metrics.REQUESTS.labels(method, "CANCELLED").inc()
        )
    return dispatched


def _parsed(parse: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return parse(raw)
    except DecodeError as err:
        raise InvalidArgument(f"the request is not a valid {method.rsplit('/', 1)[-1]} message: {err}") from None


MAX_STATUS_CHARS = 2000  # a status message travels in trailers, which gRPC caps at 8 KiB


def bounded(message: str) -> str:
    """A status message of at most MAX_STATUS_CHARS: messages quote what the caller sent, which can be long (a
    100k-character name made the trailers too large, and the caller saw RESOURCE_EXHAUSTED instead)."""
    if len(message) <= MAX_STATUS_CHARS:
        return message
    cut = len(message) - MAX_STATUS_CHARS + 40
    return (
        f"{message[: MAX_STATUS_CHARS // 2]} [... {cut} characters cut ...] {message[-(MAX_STATUS_CHARS // 2 - 40) :]}"
    )


@asynccontextmanager
async def _statuses(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn what the block raises into the call's status, and count the call by its status."""
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except RagError as err:
        code = err.code
        await context.abort(err.code, bounded(str(err)))
    except grpc.aio.AbortError:  # the servicer aborted with a status of its own
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except (asyncio.CancelledError, GeneratorExit):  # the caller went away
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as err:
        code = grpc.StatusCode.INTERNAL
        log.exception("bug while serving %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); see server logs")
    finally:
        metrics.REQUESTS.labels(method, code.name).inc()
        metrics.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - start)


@dataclass
class Served:
    """A started server: its port, its health servicer, and the task that loads its model or index."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    loading: asyncio.Task[None] | None = None
    background: asyncio.Future[None] | None = None  # periodic work (the gateway's reconciling), stopped with it
    servicers: tuple[Any, ...] = ()  # for in-process use (benchmarks, debugging)
    ready: bool = False  # what grpc.health.v1 says, readable from other threads (the /readyz probe)
    metric_families: tuple[Collector, ...] = ()  # what its /metrics serves beside metrics.COMMON

    async def mark_serving(self) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True

    async def stop(self, grace: float | None) -> None:
        self.ready = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in (self.loading, self.background):
            if task is not None and not task.done():
                task.cancel()


async def new_server(
    config: ServerConfig,
    service_names: tuple[str, ...],
    register: Callable[[grpc.aio.Server], None],
    metric_families: tuple[Collector, ...],
) -> Served:
    """Create a server, `register` its servicers, bind and start it; its services report NOT_SERVING until
    `mark_serving`. Its /metrics (see run_forever) serves `metric_families` beside metrics.COMMON."""
    limit = config.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=[StatusInterceptor()],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
            *_connection_age(config.max_connection_age_seconds),
        ],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    tls = ServerTLS(config.tls_cert, config.tls_key, config.tls_client_ca)
    where = f"{config.host}:{config.port}"
    port = server.add_secure_port(where, tls.credentials()) if tls.enabled else server.add_insecure_port(where)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    return Served(server, port, health_servicer, service_names, metric_families=metric_families)


def _connection_age(seconds: float) -> list[tuple[str, int]]:
    """Age out client connections (grpc adds jitter), so that long-lived clients re-resolve and balance over
    replicas an autoscaler added; calls in flight on an aged connection get 10 minutes to finish."""
    if seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(seconds * 1000)), ("grpc.max_connection_age_grace_ms", 600_000)]


class ComputeThread:
    """The one thread a service runs its arithmetic on, loading and warming up included.

    torch (and FAISS) give every thread that runs parallel work an OpenMP team of worker threads, kept while the
    thread lives; with more OpenMP threads than cores, libgomp stops spinning between parallel regions, and each
    small operation then waits for sleeping threads to wake. A 5-row decoding step of the demo model on 2 cores took
    ~58 ms alone and ~78 ms beside one idle thread that had once run a parallel operation. `asyncio.to_thread`
    runs work on whichever of the default executor's threads is free, and each grows a team of its own."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        """The thread ends once its work is done (and its OpenMP team with it)."""
        self._pool.shutdown(wait=False)


def start_loading(served: Served, load: Callable[[], Awaitable[None]]) -> None:
    """Run `load` in the background; the service turns SERVING when it succeeds."""

    async def load_then_serve() -> None:
        await load()
        await served.mark_serving()

    served.loading = asyncio.get_running_loop().create_task(load_then_serve())


async def run_forever(served: Served, config: ServerConfig, name: str) -> None:
    """Serve until SIGINT/SIGTERM or a failed load; then drain and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config.metrics_port:
        metrics_port = metrics.serve_metrics(
            config.host, config.metrics_port, lambda: served.ready and not stop.is_set(), served.metric_families
        )
        log.info("%s metrics on http://%s:%d/metrics (probes: /readyz, /livez)", name, config.host, metrics_port)
    print(f"{name} listening on {config.host}:{served.port}", flush=True)
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if served.loading is not None:
        waiters.append(served.loading)
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    failed = served.loading is not None and served.loading.done() and served.loading.exception() is not None
    if failed:
        assert served.loading is not None
        log.error("%s failed to load: %s", name, served.loading.exception())
    else:
        await stop.wait()
        log.info("%s draining for up to %.0fs", name, config.grace_seconds)
    await served.stop(config.grace_seconds)
    if failed:
        sys.exit(1)


def use_compute_threads(asked: int, *pools: Callable[[int], None]) -> Threads:
    """Sizes the service's compute thread pools (torch's, FAISS's setters) by `compute_threads`, and says so in
    /metrics."""
    threads = compute_threads(asked)
    for set_size in pools:
        set_size(threads.count)
    metrics.COMPUTE_THREADS.clear()  # the setting now, not every one this process had
    metrics.COMPUTE_THREADS.labels(threads.basis).set(threads.count)
    return threads


def setup_logging(level: str = "INFO") -> None:
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGBUS) leaves the Python stack in the log, not silence
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU-feature probe
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight-loading bars are noise in service logs


class ServerThread:
    """An event loop on a daemon thread, for hosting aio servers next to synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-servers", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, create: Callable[[Any], Coroutine[Any, Any, Served]], config: Any) -> Served:
        """Start a server on this loop and wait until it has loaded its model or index (or failed to)."""
        served = self.run(create(config))
        if served.loading is not None:
            self.run(asyncio.wait([served.loading]))
        return served

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
