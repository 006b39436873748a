"""The foundation every service and the `rag` command share: domain types, errors, config, serving, clients,
auth, metrics, files, paths, and the generated `rag.v1` stubs. It imports nothing above it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rag-grpc")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
