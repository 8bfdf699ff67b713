# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
STAMP := $(VENV)/.installed

MILVUS_VENV ?= .venv-milvus

.PHONY: install milvus-venv milvus-server demo test train-default distill-default bench-build bench-search bench-scale serve torture torture-milvus torture-milvus-server bench-resume clean

install: $(STAMP)

# The pinned CPU torch goes in first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python tools/demo.py --data $(DATA)

# The real data comes from ../shared/data, or from $SIAMESEDB_DATA when set (not from DATA). Under CI=true (as .ci/run
# runs it) a test whose real data or browser is absent fails instead of skipping: README "Tests".
#
# A real Milvus server for the server-variant tests (README "Scaling out"): PyPI's milvus 2.3.5 in its own venv
# ($(MILVUS_VENV): its pins clash with the project's pymilvus), started on free loopback ports with its data in a
# temp folder, its URI exported as SIAMESEDB_MILVUS_URI, its process group stopped when the tests end (trap). A
# server that cannot start is a warning here; the tests that need it then skip, or fail under CI=true. A
# SIAMESEDB_MILVUS_URI already set is used as it is (no server started). 20 ms time ticks: a Strong read waits
# up to one tick, and Milvus's 200 ms default makes the server tests several times slower.
test: install milvus-venv
	@set -u; uri="$${SIAMESEDB_MILVUS_URI:-}"; state=""; \
	if [ -z "$$uri" ]; then \
		state="$$(mktemp -d)/milvus-server.json"; \
		trap '$(BIN)/python tools/milvus_server.py stop --state "'"$$state"'" --remove-data' EXIT; \
		uri="$$($(BIN)/python tools/milvus_server.py start --venv $(MILVUS_VENV) --state "$$state" --tick-ms 20)" \
			&& echo "Milvus server for the tests: $$uri" \
			|| { echo "warning: no Milvus server started; its tests skip (fail under CI=true)" >&2; uri=""; }; \
	fi; \
	SIAMESEDB_MILVUS_URI="$$uri" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The Milvus server's own venv (made once; `python tools/milvus_server.py install`).
milvus-venv:
	$(PYTHON) tools/milvus_server.py install --venv $(MILVUS_VENV)

# A Milvus server for development, until Ctrl+C: prints its URI (pass it as --milvus-uri, or SIAMESEDB_MILVUS_URI).
milvus-server: install milvus-venv
	@state="$$(mktemp -d)/milvus-server.json"; \
	trap '$(BIN)/python tools/milvus_server.py stop --state "'"$$state"'"' EXIT INT TERM; \
	$(BIN)/python tools/milvus_server.py start --venv $(MILVUS_VENV) --state "$$state" && \
	echo "Milvus server up (state $$state); Ctrl+C stops it" && while true; do sleep 3600; done

# Train the shipped default encoder again from scratch (five stages, about an hour on 2 quiet CPU cores) and install it.
train-default: install
	$(BIN)/python tools/train_default.py --install-to siamesedb/models/default

# Distil the five-view default into a one-view student (one forward pass per image instead of five; about 25 minutes
# on 2 quiet CPU cores) and install it as siamesedb/models/default-1view; BENCHMARKS.md "One-view student".
distill-default: install
	$(BIN)/python tools/distill_default.py --out runs/distill-default --select accuracy
	$(BIN)/python tools/distill_default.py --out runs/distill-long --init runs/distill-default/student \
		--cache runs/distill-default --install-as default-1view

# The web page and HTTP API over the demo's index (run `make demo` first).
serve: install
	$(BIN)/siamesedb serve --index indexes/omniglot-demo

bench-build: install
	$(BIN)/python tools/bench_build.py --data $(DATA)

bench-search: install
	$(BIN)/python tools/bench_search.py

bench-scale: install
	$(BIN)/python tools/bench_scale.py

torture: install
	$(BIN)/python tools/torture.py --trials 400 --data $(DATA)

torture-milvus: install
	$(BIN)/python tools/torture.py --backend milvus --trials 100 --data $(DATA)

# Torture on a real Milvus server (writers killed mid-add, the server killed and restarted mid-run).
torture-milvus-server: install milvus-venv
	$(BIN)/python tools/torture.py --backend milvus --milvus-server --trials 200 --data $(DATA)

bench-resume: install
	$(BIN)/python tools/bench_resume.py --data $(DATA)

clean:
	rm -rf $(VENV) $(MILVUS_VENV) indexes/omniglot-demo runs/demo
