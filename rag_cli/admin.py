"""Operator commands against the gateway's AdminService: `rag index swap`, `rag index status`,
and the file-system side of `rag index list`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from rag.auth import bearer, load_admin_token
from rag.clients import call
from rag.config import option
from rag.tls import ClientTLSConfig
from rag.v1 import admin_pb2, admin_pb2_grpc, index_admin_pb2
from retriever_svc.layout import MANIFEST, Manifest, directory_bytes, index_names, versions


@dataclass
class AdminConfig(ClientTLSConfig):
    gateway: str = option("127.0.0.1:50051", "gateway address")
    admin_token: str = option("", "admin token; prefer the env mirror or --admin-token-file")
    admin_token_file: str = option("", "file holding the admin token")
    timeout: float = option(900.0, "deadline in seconds")
    json: bool = option(False, "print one JSON document instead of a table")


@dataclass
class SwapConfig(AdminConfig):
    name: str = option("", "index name; default: the name being served")


def swap(config: AdminConfig, version: str, name: str = "") -> admin_pb2.SwapIndexResponse:
    """Swap every retriever to `version` (of `name`, default: the index being served); the gateway checks both."""
    request = admin_pb2.SwapIndexRequest(name=name, version=version)
    metadata = bearer(load_admin_token(config.admin_token, config.admin_token_file))
    return call(
        config.gateway,
        lambda ch: admin_pb2_grpc.AdminServiceStub(ch).SwapIndex(request, timeout=config.timeout, metadata=metadata),
        config.client_tls(),
    )


def statuses(config: AdminConfig) -> list[index_admin_pb2.IndexStatus]:
    request = admin_pb2.ListIndexStatusRequest()
    metadata = bearer(load_admin_token(config.admin_token, config.admin_token_file))
    reply = call(
        config.gateway,
        lambda ch: admin_pb2_grpc.AdminServiceStub(ch).ListIndexStatus(
            request, timeout=config.timeout, metadata=metadata
        ),
        config.client_tls(),
    )
    return list(reply.retrievers)


def format_statuses(found: list[index_admin_pb2.IndexStatus]) -> str:
    rows = [("RETRIEVER", "SHARD", "ACTIVE", "STAGED", "PREVIOUS", "PASSAGES", "IN FLIGHT")]
    for s in found:
        in_flight = sum(s.in_flight.values())
        rows.append((s.endpoint, f"{s.shard}/{s.num_shards}", s.active_version, s.staged_version or "-",
                     s.previous_version or "-", str(s.active_passages), str(in_flight)))  # fmt: skip
    return _table(rows)


def version_records(root: Path, serving: dict[str, list[str]] | None) -> list[dict[str, Any]]:
    """Every version under the index root, with the retrievers serving it (None when the gateway was not asked)."""
    records = []
    for name in index_names(root):
        for version in versions(root, name):
            manifest = Manifest.from_file(root / name / version / MANIFEST)
            records.append({
                "index": str(manifest.ref), "passages": manifest.count, "shards": manifest.num_shards,
                "type": manifest.index_type, "bytes": directory_bytes(root / name / version),
                "lexical": {"bytes": manifest.lexical["bytes"], "build_seconds": manifest.lexical["build_seconds"],
                            "terms": manifest.lexical["vocabulary"]} if manifest.lexical else None,
                "created_at": manifest.created_at,
                "served_by": None if serving is None else serving.get(str(manifest.ref), []),
            })  # fmt: skip
    return records


def format_versions(root: Path, records: list[dict[str, Any]]) -> str:
    rows = [("INDEX", "PASSAGES", "SHARDS", "TYPE", "SIZE", "LEXICAL", "CREATED", "SERVED BY")]
    for r in records:
        served = "?" if r["served_by"] is None else ", ".join(r["served_by"]) or "-"
        lexical = (
            f"{r['lexical']['bytes'] / 2**20:.1f} MiB, built in {r['lexical']['build_seconds']:.1f} s"
            if r["lexical"]
            else "none"
        )
        rows.append((r["index"], str(r["passages"]), str(r["shards"]), r["type"], f"{r['bytes'] / 2**20:.1f} MiB",
                     lexical, r["created_at"], served))  # fmt: skip
    return _table(rows) if len(rows) > 1 else f"no indexes under {root}"


def admin_json(value: Message | Sequence[Message]) -> str:
    """The JSON a `--json` admin command prints (protobuf field names)."""
    if isinstance(value, Message):
        return json.dumps(MessageToDict(value, preserving_proto_field_name=True))
    return json.dumps([MessageToDict(v, preserving_proto_field_name=True) for v in value])


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
