# Tabadol: every target sets up what it needs. `make run` and `make test` are all a fresh machine needs.
PYTHON_BOOT ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PROTOS      := $(shell find protos -name '*.proto' | sort)
CONTRACTS   := build/contracts.pb
GEN_STAMP   := build/.protos

CHROMIUM    := /usr/bin/chromium
CURL        := /usr/bin/curl
NODE_DIR    := interop/node
NODE_STAMP  := $(NODE_DIR)/node_modules/.installed

.PHONY: setup protos run test soak lint lint-protos fmt typecheck clean browser curl node bench bench-alternate bench-scale bench-ledger postgres

setup: $(STAMP) $(GEN_STAMP)

node: $(NODE_STAMP)

# The cross-language interop tests (tests/test_interop_node.py) run a Node.js consumer and
# provider; `npm ci` installs exactly what package-lock.json pins. The stamp lives inside
# node_modules, so deleting node_modules reinstalls.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null \
	  && node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)' \
	  || { echo "node is missing: the cross-language interop tests need Node.js 18+ and npm (apt-get install nodejs npm)"; exit 1; }
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

protos: $(GEN_STAMP)

# Messages, gRPC stubs and their .pyi type stubs (protoc's for messages, mypy-protobuf's for
# services) into clients/ (import path = proto package), and one FileDescriptorSet with
# imports and comments for the broker. google/api/*.proto (the HTTP rules) come with
# googleapis-common-protos, in the venv's site-packages.
GOOGLEAPIS  = $$($(PY) -c 'import pathlib, google.api.annotations_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')

$(GEN_STAMP): $(STAMP) $(PROTOS)
	mkdir -p build
	find clients/tabadol -name '*_pb2*.py*' -delete
	$(PY) -m grpc_tools.protoc -Iprotos -I"$(GOOGLEAPIS)" \
	  --python_out=clients --pyi_out=clients --grpc_python_out=clients \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=quiet:clients \
	  --include_imports --include_source_info --descriptor_set_out=$(CONTRACTS) \
	  $(PROTOS)
	touch $@

# A Debian package the tests use, installed once: $(call debian_package,PACKAGE,WHO USES IT).
define debian_package
	@command -v apt-get >/dev/null || { echo "error: $(2) need Debian's $(1) at $@; install it"; exit 1; }
	@[ "$$(id -u)" = 0 ] || { echo "error: installing $(1) needs root: run 'sudo apt-get install $(1)'"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null
	test -x $@
endef

# The browser tests drive Debian's Chromium with Playwright; Playwright's own browser
# download is never used (and would fail without internet).
browser: $(CHROMIUM)

$(CHROMIUM):
	$(call debian_package,chromium,the browser tests)

# The HTTP/JSON gateway's tests call it with Debian's curl too (tests/test_gateway_clients.py).
curl: $(CURL)

$(CURL):
	$(call debian_package,curl,the gateway tests)

# The PostgreSQL tests (registry, ledger and span store on a server database) start a private
# cluster of their own from Debian's postgresql package (tests/support/postgres.py), unless
# TABADOL_TEST_POSTGRES names a server. `make run` needs no database: SQLite is the default.
postgres:
	@if [ -n "$$TABADOL_TEST_POSTGRES" ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "error: the PostgreSQL tests need Debian's postgresql package (or TABADOL_TEST_POSTGRES=postgresql://...)"; exit 1; }; \
	[ "$$(id -u)" = 0 ] || { echo "error: installing postgresql needs root: run 'sudo apt-get install postgresql', or set TABADOL_TEST_POSTGRES=postgresql://..."; exit 1; }; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null

run: setup
	$(VENV)/bin/tabadol demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Contract style, in the spirit of buf lint (docs/contracts.md).
lint-protos: setup
	$(VENV)/bin/tabadol contracts lint protos

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: setup
	$(VENV)/bin/mypy server/tabadol clients/tabadol

test: setup browser curl node postgres lint lint-protos typecheck
	$(VENV)/bin/pytest -q

# The load and fault suite with ten times the calls (not part of `make test`).
soak: setup
	TABADOL_SOAK=1 $(VENV)/bin/pytest -q tests/test_load_faults.py

# Benchmarks (docs/performance.md), not part of `make test`: BENCH_SECONDS per measurement.
BENCH_SECONDS ?= 5
bench: setup
	BENCH_SECONDS=$(BENCH_SECONDS) $(PY) bench/run.py

# The broker/bare CPU ratio measured in alternating turns, steadier on a shared machine.
bench-alternate: setup
	BENCH_SECONDS=$(BENCH_SECONDS) $(PY) bench/alternate.py

# Several broker nodes on one PostgreSQL (docs/performance.md): a private server from
# Debian's package unless TABADOL_TEST_POSTGRES names one.
bench-scale: setup postgres
	BENCH_SECONDS=$(BENCH_SECONDS) $(PY) bench/scale_out.py

# The ledger at national scale (docs/performance.md): SQLite ledgers of 1 M and 10 M records
# over a quarter, about 10 GB in a temporary directory on /tmp; writes
# bench/results/ledger-scale.json. LEDGER_BENCH_ARGS=--quick for a sanity run of a few minutes.
LEDGER_BENCH_ARGS ?=
bench-ledger: setup
	$(PY) bench/ledger_scale.py $(LEDGER_BENCH_ARGS)

clean:
	rm -rf build $(VENV)
	find clients/tabadol -name '*_pb2*.py*' -delete
