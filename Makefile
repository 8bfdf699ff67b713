# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
STAMP := $(VENV)/.installed

.PHONY: install demo test train-default distill-default bench-build bench-search bench-scale serve torture torture-milvus bench-resume clean

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
test: install
	$(BIN)/python -m pytest -q

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

bench-resume: install
	$(BIN)/python tools/bench_resume.py --data $(DATA)

clean:
	rm -rf $(VENV) indexes/omniglot-demo runs/demo
