"""The `rag` command line: build indexes, run services, ask questions, run the demo.

    rag index build --corpus PATH [--format jsonl|dpr-tsv] [--index-root DIR] [--name NAME] [--encoder SPEC]
                    [--index-type flat|hnsw|ivfpq] [--shards N]   last stdout line: the new version id
    rag index swap VERSION [--name NAME] [--gateway ADDR]       (admin token: RAG_ADMIN_TOKEN)
    rag index status [--gateway ADDR]
    rag index list [--index-root DIR] [--gateway ADDR]
    rag serve retriever|generator|gateway [options]
    rag up [--index-root DIR] [--index NAME[@VERSION]] [--encoder SPEC] [--generator SPEC]
    rag ask QUESTION [--mode token|sequence] [--k K] [--json] [--gateway ADDR]
    rag demo
    rag fetch [--model NAME]                                     (the demo's corpus and models into $RAG_HOME)
    rag bench [--quick] [--only SECTIONS] [--json]
    rag eval QUESTIONS [--mode token|sequence|closed-book|concat|retrieve] [--k K] [--limit N] [--json]
    rag train QUESTIONS --index NAME[@VERSION] [--train query-encoder|generator|both] [--mode token|sequence]
              [--k K] [--epochs N] [--max-steps N] [--lr LR] [--lora-rank R] [--dev QUESTIONS] [--out DIR]

Every option has an environment mirror (RAG_<OPTION>), shown in --help. torch and transformers load only in the
commands that need them (the service modules and index builds are imported there), so `rag ask` starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway.config import GatewayConfig
from generator_svc.config import GeneratorConfig
from rag import __version__, paths
from rag.config import add_config_flags, config_from_args, option
from rag.errors import RagError
from rag.index_ref import IndexRef
from rag.serving import Served, ServerConfig, run_forever, setup_logging, use_compute_threads
from rag_cli.admin import (
    AdminConfig,
    SwapConfig,
    admin_json,
    format_statuses,
    format_versions,
    statuses,
    swap,
    version_records,
)
from rag_cli.ask import AskConfig, as_json, ask, ask_stream, format_sources
from rag_cli.bench import BenchConfig, figures_as_json, markdown, run_bench
from rag_cli.demo import DemoConfig, FetchConfig, fetch, run_demo
from rag_cli.eval import EvalConfig, markdown_table, run_eval
from rag_cli.train_config import TrainConfig
from rag_cli.up import UpConfig, run_up
from retriever_svc.config import RetrieverConfig


@dataclass
class BuildConfig:
    corpus: str = option("", "corpus file: JSONL {id,title,text} or DPR psgs_w100.tsv (.gz allowed)", required=True)
    format: str = option("", "jsonl or dpr-tsv; default: from the file name")
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    name: str = option("default", "index name; each build adds a new version of it")
    encoder: str = option(
        "", "encoder spec (sentence-transformer:PATH or dpr:question=PATH,context=PATH); default: the demo MiniLM"
    )
    index_type: str = option("flat", "flat (exact), hnsw, ivfpq, or a faiss factory string such as HNSW64,Flat")
    shards: int = option(1, "split the passages into this many shards, one retriever each")
    passage_words: int = option(100, "split documents into passages of at most this many words")
    reuse_embeddings: bool = option(
        True, "copy embeddings of unchanged passages from the newest version by this encoder"
    )
    reuse_from: str = option(
        "", "reuse embeddings from this index (NAME[@VERSION]) instead of the newest version of --name"
    )
    lexical: bool = option(True, "build a lexical (BM25) index beside the dense one, for lexical and hybrid retrieval")
    kv_cache: str = option(
        "",
        "also run every passage through --generator's passage KV cache into this directory (the disk tier that "
        "generators serving with --kv-cache-dir DIR read: no passage's prompt work at request time); empty: none",
    )
    generator: str = option(paths.demo_generator_spec(), "with --kv-cache: the generator that will serve the index")
    generator_dtype: str = option("auto", "with --kv-cache: the precision it will serve in (auto, float32, bfloat16)")
    progress: bool = option(True, "show a progress bar")


@dataclass
class ListConfig(AdminConfig):
    """The gateway (with the admin token) is asked which versions are being served."""

    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")


def _size_thread_pools() -> None:
    """For the commands that compute here (index builds, training): torch's and FAISS's pools as a service sizes
    them, by the container's CPU limit rather than the node's cores (an index-build Job under `limits.cpu`)."""
    import faiss
    import torch

    use_compute_threads(0, torch.set_num_threads, faiss.omp_set_num_threads)


def _index_build(config: BuildConfig) -> int:
    from retriever_svc.build import build_index
    from retriever_svc.corpus import guess_format
    from retriever_svc.encoders import load_encoder

    _size_thread_pools()
    corpus = Path(config.corpus)
    reuse_from = IndexRef.parse(config.reuse_from, version_required=False) if config.reuse_from else None
    encoder = load_encoder(config.encoder or paths.demo_encoder_spec())
    manifest = build_index(
        corpus,
        config.format or guess_format(corpus),
        Path(config.index_root),
        config.name,
        encoder,
        config.index_type,
        config.passage_words,
        shards=config.shards,
        reuse_embeddings=config.reuse_embeddings,
        reuse_from=reuse_from,
        show_progress=config.progress,
        lexical=config.lexical,
    )
    reused, lexical = manifest.embeddings_reused, manifest.lexical
    print(
        f"built {manifest.ref}: {manifest.count} passages in {manifest.num_shards} shard(s), {manifest.index_type}, "
        f"dim {manifest.dim}"
        + (f"; {reused['passages']} embeddings reused from {reused['from']}" if reused else "")
        + (f"; lexical index of {lexical['vocabulary']} terms in {lexical['build_seconds']:.2f} s" if lexical else ""),
        file=sys.stderr,
    )
    if config.kv_cache:
        from rag_cli.kv_fill import fill_kv_cache

        version_dir = Path(config.index_root) / manifest.name / manifest.version
        ran, there = fill_kv_cache(
            version_dir, manifest, Path(config.kv_cache), config.generator, config.generator_dtype, config.progress
        )
        print(
            f"passage KV cache in {config.kv_cache}: {ran} passage segments run, {there} there already", file=sys.stderr
        )
    print(manifest.version)
    return 0


def _index_swap(args: argparse.Namespace) -> int:
    config = config_from_args(SwapConfig, args)
    reply = swap(config, args.version, config.name)
    if config.json:
        print(admin_json(reply))
        return 0
    print(
        f"swapped {reply.previous_version or '(none)'} -> {reply.index_version} on {reply.retrievers} retriever(s) "
        f"(load {reply.load_seconds:.2f} s, activate {reply.activate_seconds * 1000:.0f} ms)"
    )
    return 0


def _index_status(args: argparse.Namespace) -> int:
    config = config_from_args(AdminConfig, args)
    found = statuses(config)
    print(admin_json(found) if config.json else format_statuses(found))
    return 0


def _index_list(args: argparse.Namespace) -> int:
    config = config_from_args(ListConfig, args)
    serving: dict[str, list[str]] | None = None
    if config.admin_token or config.admin_token_file:
        try:
            found = statuses(dataclasses.replace(config, timeout=10))
            serving = {}
            for s in found:
                serving.setdefault(s.active_version, []).append(f"{s.endpoint} (shard {s.shard})")
        except RagError as err:
            print(f"(not showing what is served: {err})", file=sys.stderr)
    records = version_records(Path(config.index_root), serving)
    print(json.dumps(records) if config.json else format_versions(Path(config.index_root), records))
    return 0


def _serve(service: str, args: argparse.Namespace) -> int:

    setup_logging()

    async def create() -> tuple[Served, ServerConfig]:
        if service == "retriever":
            from retriever_svc.server import create_server as create_retriever

            retriever_config = config_from_args(RetrieverConfig, args)
            return await create_retriever(retriever_config), retriever_config
        if service == "generator":
            from generator_svc.server import create_server as create_generator

            generator_config = config_from_args(GeneratorConfig, args)
            return await create_generator(generator_config), generator_config
        from gateway.server import create_server as create_gateway

        gateway_config = config_from_args(GatewayConfig, args)
        return await create_gateway(gateway_config), gateway_config

    async def main() -> None:
        served, config = await create()
        await run_forever(served, config, service)

    asyncio.run(main())
    return 0


def _ask(args: argparse.Namespace) -> int:
    config = config_from_args(AskConfig, args)
    request = config.request(args.question)
    mode = request.options.mode
    if config.json:
        print(
            json.dumps(
                as_json(ask(request, config.gateway, config.timeout, config.client_tls()), mode), ensure_ascii=False
            )
        )
        return 0
    print(f"Q: {request.question}\nA: ", end="", flush=True)  # then the answer as it is decoded
    answer = None
    for event in ask_stream(request, config.gateway, config.timeout, config.client_tls()):
        if isinstance(event, str):
            print(event, end="", flush=True)
        else:
            answer = event
    print()
    if answer is not None:
        print(format_sources(answer, mode))
    return 0


class StrictParser(argparse.ArgumentParser):
    """No abbreviated flags: a manifest or script naming `--no-progres` fails instead of guessing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag", description="Retrieval-augmented generation over gRPC.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"rag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=StrictParser)

    index = commands.add_parser("index", help="build, list and swap indexes").add_subparsers(
        dest="index_command", required=True, parser_class=StrictParser
    )
    add_config_flags(index.add_parser("build", help="build a new index version from a corpus"), BuildConfig)
    swap = index.add_parser("swap", help="swap every retriever to another version (two phases, all or nothing)")
    swap.add_argument("version", help="version to serve, e.g. v3 (rollback: the previous version)")
    add_config_flags(swap, SwapConfig)
    add_config_flags(index.add_parser("status", help="the versions every retriever holds"), AdminConfig)
    add_config_flags(index.add_parser("list", help="every version under the index root, and who serves it"), ListConfig)

    serve = commands.add_parser("serve", help="run one service").add_subparsers(
        dest="service", required=True, parser_class=StrictParser
    )
    for name, config_class in (
        ("retriever", RetrieverConfig),
        ("generator", GeneratorConfig),
        ("gateway", GatewayConfig),
    ):
        add_config_flags(serve.add_parser(name, help=f"run the {name}"), config_class)

    add_config_flags(commands.add_parser("up", help="run all three services on loopback"), UpConfig)

    ask_parser = commands.add_parser("ask", help="ask the gateway a question")
    ask_parser.add_argument("question")
    add_config_flags(ask_parser, AskConfig)

    add_config_flags(
        commands.add_parser("demo", help="fetch the demo models and corpus, index, serve, ask"), DemoConfig
    )
    add_config_flags(commands.add_parser("fetch", help="fetch the demo models and corpus into $RAG_HOME"), FetchConfig)

    add_config_flags(commands.add_parser("bench", help="speed against reference implementations (ratios)"), BenchConfig)

    train = commands.add_parser("train", help="fine-tune the query encoder and generator end to end (paper 2.4)")
    train.add_argument("questions", help="training questions with answers: JSONL, SQuAD v1.1 JSON or DPR QA TSV")
    add_config_flags(train, TrainConfig)

    evaluate = commands.add_parser("eval", help="score a question set through the gateway (EM, F1, recall@k)")
    evaluate.add_argument("questions", help="JSONL, SQuAD v1.1 JSON or DPR QA TSV")
    add_config_flags(evaluate, EvalConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[], int]] = {
        "index": lambda: {
            "build": lambda: _index_build(config_from_args(BuildConfig, args)),
            "swap": lambda: _index_swap(args),
            "status": lambda: _index_status(args),
            "list": lambda: _index_list(args),
        }[args.index_command](),
        "serve": lambda: _serve(args.service, args),
        "up": lambda: _up(args),
        "ask": lambda: _ask(args),
        "demo": lambda: _demo(args),
        "fetch": lambda: _fetch(args),
        "eval": lambda: _eval(args),
        "train": lambda: _train(args),
        "bench": lambda: _bench(args),
    }
    try:
        return handlers[args.command]()
    except RagError as err:
        print(f"rag {args.command}: {err}", file=sys.stderr)
        return exit_code(err)


def exit_code(err: RagError) -> int:
    """2 when what the command was given is invalid (as argparse exits on a bad flag), 1 when it failed."""
    return 2 if err.code is grpc.StatusCode.INVALID_ARGUMENT else 1


def _up(args: argparse.Namespace) -> int:
    setup_logging()
    return run_up(config_from_args(UpConfig, args))


def _bench(args: argparse.Namespace) -> int:
    config = config_from_args(BenchConfig, args)
    figures = run_bench(config)
    print(figures_as_json(figures) if config.json else markdown(figures))
    return 0


def _eval(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    summaries = run_eval(Path(args.questions), config)
    if config.json:
        print(json.dumps(summaries[-1] if len(summaries) == 1 else {"sweep": summaries, **summaries[-1]}))
    else:
        print(markdown_table(summaries))
    return 0


def _train(args: argparse.Namespace) -> int:
    from rag_cli.train import run_train  # loads torch and the models

    setup_logging()
    _size_thread_pools()
    outputs = run_train(Path(args.questions), config_from_args(TrainConfig, args))
    if outputs is not None:  # rank 0 of data-parallel training (or the only process) reports
        print(outputs.to_json(), flush=True)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    setup_logging()
    for what, where in fetch(config_from_args(FetchConfig, args)).items():
        print(f"{what}: {where}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    setup_logging()
    return run_demo(config_from_args(DemoConfig, args))
