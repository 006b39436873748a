"""Generated from protos/rag/v1 by scripts/gen_protos.py; do not edit."""
