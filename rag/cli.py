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

Every option has an environment mirror (RAG_<OPTION>), shown in --help. Heavy libraries load only in the
commands that need them, so `rag ask` starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag import paths
from rag.config import add_config_flags, config_from_args, option
from rag.errors import RagError


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
    progress: bool = option(True, "show a progress bar")


@dataclass
class ListConfig:
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    gateway: str = option("127.0.0.1:50051", "gateway to ask which versions are being served (needs the admin token)")
    admin_token: str = option("", "admin token; prefer the env mirror or --admin-token-file")
    admin_token_file: str = option("", "file holding the admin token")


def _index_build(config: BuildConfig) -> int:
    from retriever_svc.corpus import guess_format
    from retriever_svc.encoders import load_encoder
    from retriever_svc.index import build_index

    corpus = Path(config.corpus)
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
        reuse_from=config.reuse_from,
        show_progress=config.progress,
    )
    reused = manifest.embeddings_reused
    print(
        f"built {manifest.ref}: {manifest.count} passages in {manifest.num_shards} shard(s), {manifest.index_type}, "
        f"dim {manifest.dim}" + (f"; {reused['passages']} embeddings reused from {reused['from']}" if reused else ""),
        file=sys.stderr,
    )
    print(manifest.version)
    return 0


def _index_swap(args: argparse.Namespace) -> int:
    from rag.admin_client import SwapConfig, swap

    config = config_from_args(SwapConfig, args)
    reply = swap(config, args.version, config.name)
    print(
        f"swapped {reply.previous_version or '(none)'} -> {reply.index_version} on {reply.retrievers} retriever(s) "
        f"(load {reply.load_seconds:.2f} s, activate {reply.activate_seconds * 1000:.0f} ms)"
    )
    return 0


def _index_status(args: argparse.Namespace) -> int:
    from rag.admin_client import AdminConfig, format_statuses, statuses

    print(format_statuses(statuses(config_from_args(AdminConfig, args))))
    return 0


def _index_list(args: argparse.Namespace) -> int:
    from rag.admin_client import AdminConfig, format_versions, statuses

    config = config_from_args(ListConfig, args)
    serving: dict[str, list[str]] | None = None
    if config.admin_token or config.admin_token_file:
        try:
            found = statuses(AdminConfig(config.gateway, config.admin_token, config.admin_token_file, timeout=10))
            serving = {}
            for s in found:
                serving.setdefault(s.active_version, []).append(f"{s.endpoint} (shard {s.shard})")
        except RagError as err:
            print(f"(not showing what is served: {err})", file=sys.stderr)
    print(format_versions(Path(config.index_root), serving))
    return 0


def _serve(service: str, args: argparse.Namespace) -> int:
    from rag.serving import run_forever, setup_logging

    setup_logging()
    if service == "retriever":
        from retriever_svc.config import RetrieverConfig as Config
        from retriever_svc.server import create_server
    elif service == "generator":
        from generator_svc.config import GeneratorConfig as Config  # type: ignore[assignment]
        from generator_svc.server import create_server  # type: ignore[assignment]
    else:
        from gateway.config import GatewayConfig as Config  # type: ignore[assignment]
        from gateway.server import create_server  # type: ignore[assignment]
    config = config_from_args(Config, args)

    async def main() -> None:
        served = await create_server(config)  # type: ignore[arg-type]
        await run_forever(served, config, service)

    asyncio.run(main())
    return 0


def _ask(args: argparse.Namespace) -> int:
    from rag.ask import AskConfig, ask, format_answer

    config = config_from_args(AskConfig, args)
    result = ask(args.question, config)
    print(json.dumps(result, ensure_ascii=False) if config.json else format_answer(args.question, result))
    return 0


class StrictParser(argparse.ArgumentParser):
    """No abbreviated flags: a manifest or script naming `--no-progres` fails instead of guessing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def build_parser() -> argparse.ArgumentParser:
    from gateway.config import GatewayConfig
    from generator_svc.config import GeneratorConfig
    from rag.admin_client import AdminConfig, SwapConfig
    from rag.ask import AskConfig
    from rag.bench import BenchConfig
    from rag.demo import DemoConfig, FetchConfig
    from rag.eval import EvalConfig
    from rag.up import UpConfig
    from retriever_svc.config import RetrieverConfig

    parser = argparse.ArgumentParser(
        prog="rag", description="Retrieval-augmented generation over gRPC.", allow_abbrev=False
    )
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
        "bench": lambda: _bench(args),
    }
    try:
        return handlers[args.command]()
    except RagError as err:
        print(f"rag {args.command}: {err}", file=sys.stderr)
        return 2


def _up(args: argparse.Namespace) -> int:
    from rag.serving import setup_logging
    from rag.up import UpConfig, run_up

    setup_logging()
    return run_up(config_from_args(UpConfig, args))


def _bench(args: argparse.Namespace) -> int:
    from rag.bench import BenchConfig, as_json, markdown, run_bench

    config = config_from_args(BenchConfig, args)
    figures = run_bench(config)
    print(markdown(figures))
    if config.json:
        print(as_json(figures))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rag.eval import EvalConfig, markdown_table, run_eval

    config = config_from_args(EvalConfig, args)
    summaries = run_eval(Path(args.questions), config)
    print(markdown_table(summaries))
    if config.json:
        print(json.dumps(summaries[-1] if len(summaries) == 1 else {"sweep": summaries, **summaries[-1]}))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from rag.demo import FetchConfig, fetch
    from rag.serving import setup_logging

    setup_logging()
    for what, where in fetch(config_from_args(FetchConfig, args)).items():
        print(f"{what}: {where}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rag.demo import DemoConfig, run_demo
    from rag.serving import setup_logging

    setup_logging()
    return run_demo(config_from_args(DemoConfig, args))


if __name__ == "__main__":
    sys.exit(main())
