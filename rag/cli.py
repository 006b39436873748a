"""The `rag` command line: build indexes, run services, ask questions, run the demo.

    rag index build --corpus PATH [--format jsonl|dpr-tsv] [--index-root DIR] [--name NAME] [--encoder SPEC]
                    [--index-type flat|hnsw|ivfpq]           last stdout line: the new version id
    rag serve retriever|generator|gateway [options]
    rag up [--index-root DIR] [--index NAME[@VERSION]] [--encoder SPEC] [--generator SPEC]
    rag ask QUESTION [--mode token|sequence] [--k K] [--json] [--gateway ADDR]
    rag demo

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

from rag import paths
from rag.config import add_config_flags, config_from_args, option
from rag.errors import RagError


@dataclass
class BuildConfig:
    corpus: str = option("", "corpus file: JSONL {id,title,text} or DPR psgs_w100.tsv (.gz allowed)", required=True)
    format: str = option("", "jsonl or dpr-tsv; default: from the file name")
    index_root: str = option(str(paths.index_root()), "directory holding the versioned indexes")
    name: str = option("default", "index name; each build adds a new version of it")
    encoder: str = option("", "encoder spec (sentence-transformer:PATH or dpr:question=PATH,context=PATH); default: the demo MiniLM")
    index_type: str = option("flat", "flat (exact), hnsw, ivfpq, or a faiss factory string such as HNSW64,Flat")
    passage_words: int = option(100, "split documents into passages of at most this many words")
    progress: bool = option(True, "show a progress bar")


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
        show_progress=config.progress,
    )
    print(f"built {manifest.ref}: {manifest.count} passages, {manifest.index_type}, dim {manifest.dim}", file=sys.stderr)
    print(manifest.version)
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


def build_parser() -> argparse.ArgumentParser:
    from gateway.config import GatewayConfig
    from generator_svc.config import GeneratorConfig
    from rag.ask import AskConfig
    from rag.demo import DemoConfig
    from rag.up import UpConfig
    from retriever_svc.config import RetrieverConfig

    parser = argparse.ArgumentParser(prog="rag", description="Retrieval-augmented generation over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", help="build indexes").add_subparsers(dest="index_command", required=True)
    add_config_flags(index.add_parser("build", help="build a new index version from a corpus"), BuildConfig)

    serve = commands.add_parser("serve", help="run one service").add_subparsers(dest="service", required=True)
    for name, config_class in (("retriever", RetrieverConfig), ("generator", GeneratorConfig), ("gateway", GatewayConfig)):
        add_config_flags(serve.add_parser(name, help=f"run the {name}"), config_class)

    add_config_flags(commands.add_parser("up", help="run all three services on loopback"), UpConfig)

    ask_parser = commands.add_parser("ask", help="ask the gateway a question")
    ask_parser.add_argument("question")
    add_config_flags(ask_parser, AskConfig)

    add_config_flags(commands.add_parser("demo", help="fetch the demo models and corpus, index, serve, ask"), DemoConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[], int]] = {
        "index": lambda: _index_build(config_from_args(BuildConfig, args)),
        "serve": lambda: _serve(args.service, args),
        "up": lambda: _up(args),
        "ask": lambda: _ask(args),
        "demo": lambda: _demo(args),
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


def _demo(args: argparse.Namespace) -> int:
    from rag.demo import DemoConfig, run_demo
    from rag.serving import setup_logging

    setup_logging()
    return run_demo(config_from_args(DemoConfig, args))


if __name__ == "__main__":
    sys.exit(main())
