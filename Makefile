# make demo: fetch the demo models and corpus, build the index, serve, ask, stop (first run ~10 min on 2 cores).
# make test: the test suite (tiny random models, plus one real-model smoke test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

CODE := rag rag_cli retriever_svc generator_svc gateway tests bench scripts
BUF := tools/node_modules/.bin/buf

.PHONY: demo test lint install protos clean

$(INSTALLED): pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/rag demo

test: $(INSTALLED) lint
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python -m pytest

$(BUF): tools/package.json tools/package-lock.json
	npm ci --prefix tools --silent --no-audit --no-fund
	touch $(BUF)

# Style and obvious bugs (ruff; the generated stubs are left as protoc writes them), the layer contracts
# (import-linter: imports run one way, see pyproject.toml), the types (mypy, with the generated .pyi stubs), and
# the protos (buf, from npm: the STANDARD lint rules, nothing breaking against the last release; see buf.yaml).
lint: $(INSTALLED) $(BUF)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BUF) lint
	$(BUF) breaking --against protos/released.binpb

# Regenerate rag/v1 from protos/rag/v1 (the stubs are committed; `make test` fails when they are stale).
protos: $(INSTALLED)
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache tools/node_modules
