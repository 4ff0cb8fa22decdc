# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnconv-installed

.PHONY: test test-engines demo lint tools clean bench

tools:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) is missing; install Python >= 3.10" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: Python >= 3.10 is needed" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "error: the Python venv module is missing; install python3-venv" >&2; exit 1; }

$(STAMP): pyproject.toml | tools
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build installs from local disk; an unpinned one pulls GBs of CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check attnconv tests benchmarks scripts

# one worker per core (pytest-xdist), a test file per worker so that module fixtures are built once
test: lint
	$(VENV)/bin/pytest -q -n auto --dist loadfile

# Opt-in: builds llama.cpp once into $$ATTNCONV_CACHE/llama.cpp (CPU, minutes), then checks that it serves the
# DeepSeek-V3 output exactly as transformers runs it. CI never runs this.
test-engines: $(STAMP)
	$(PY) scripts/build_llamacpp.py
	$(VENV)/bin/pytest -q -s -m engines tests/test_engines_llamacpp.py

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) benchmarks/convert.py
	$(PY) benchmarks/perplexity.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/uptrain.py
	$(PY) benchmarks/paper_gqa.py
	$(PY) benchmarks/mla.py
	$(PY) benchmarks/mla_convert.py
	$(PY) benchmarks/mla_quality.py
	$(PY) benchmarks/methods.py --uptrain mean,grouped+aligned+fit --uptrain-kv 2,1
	$(PY) benchmarks/recipe_overhead.py

clean:
	rm -rf $(VENV) demo-out recipes/.demo.attnconv-run.json
