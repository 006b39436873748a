"""Generate the Python stubs of protos/rag/v1/*.proto into rag/v1/ (committed), or --check they are current.

Type stubs (.pyi) come from mypy-protobuf, for the messages and the gRPC stubs and servicers, so the type
checker sees every field, enum and RPC."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def _plugin(name: str) -> str:
    """A protoc plugin installed next to this Python (mypy-protobuf's)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found next to {sys.executable}: install the dev requirements (mypy-protobuf)")
    return f"--plugin={name}={path}"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("rag/v1/*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
    ]
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise SystemExit("protoc failed")
    package = out_dir / "rag" / "v1"
    (package / "__init__.py").write_text('"""Generated from protos/rag/v1 by scripts/gen_protos.py; do not edit."""\n')
    return sorted(p.relative_to(out_dir) for p in package.iterdir() if p.is_file())


def main() -> None:
    if "--check" not in sys.argv:
        generate(ROOT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p.relative_to(ROOT) for p in (ROOT / "rag" / "v1").iterdir() if p.is_file())
        stale = [str(p) for p in fresh if not (ROOT / p).exists() or not filecmp.cmp(Path(tmp) / p, ROOT / p, False)]
        extra = [str(p) for p in committed if p not in fresh]
        if stale or extra:
            raise SystemExit(f"generated stubs are stale: {stale + extra}; run `make protos`")


if __name__ == "__main__":
    main()
