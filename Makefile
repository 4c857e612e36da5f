# `make demo` and `make test` work on a fresh machine: they create or reuse .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# faiss-gpu where a GPU is visible, faiss-cpu otherwise (both provide the `faiss` module).
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DATA ?= demo/gardens_point_sample
OUT ?= out/demo
PYTEST_ARGS ?=
# pytest-xdist workers: the suite's jobs leave about a quarter of 2 cores idle (Ray start-ups,
# waits on heads and nodes); two workers fill it. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: venv demo test test-tools lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	touch $@

venv: $(VENV)/.installed

# Demo: EfficientNet-Lite0 (offline ImageNet weights) on the bundled Gardens Point sample,
# day_right -> night_right. `make demo DATA=/path/to/gardens_point` runs on a full copy: a traverse
# with a manifest (DATA/day_right.csv) is read from it, a bare folder as a `sequence:` dataset
# (frame index = position), so radius 2 means "within 2 frames".
DEMO_DB = $(if $(wildcard $(DATA)/day_right.csv),$(DATA)/day_right.csv,sequence:$(DATA)/day_right)
DEMO_Q = $(if $(wildcard $(DATA)/night_right.csv),$(DATA)/night_right.csv,sequence:$(DATA)/night_right)
demo: venv
	$(VENV)/bin/r2f run --database $(DEMO_DB) --queries $(DEMO_Q) \
	    --backbone efficientnet-lite0 --positive-radius 2 --image-size 272 480 --out $(OUT)
	@echo "report: $(OUT)/report.html"

# What the tests need beyond Python: Debian's Chromium (the report tests render report.html in it).
# Installed through apt-get when this user can (root, or sudo without a password); otherwise this
# stops before pytest and prints the command to run.
CHROMIUM_CMD := $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
test-tools:
ifeq ($(CHROMIUM_CMD),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report tests"; \
	    ( $(APT_INSTALL) ) >/dev/null || { echo "could not install chromium; run: $(APT_INSTALL)"; exit 1; }; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report tests (sudo)"; \
	    ( sudo sh -c '$(APT_INSTALL)' ) >/dev/null || { echo "could not install chromium; run: sudo sh -c '$(APT_INSTALL)'"; exit 1; }; \
	else \
	    echo "the report tests need Chromium, which this user cannot install; run:"; \
	    echo "    sudo sh -c '$(APT_INSTALL)'"; \
	    echo "then make test again"; exit 1; \
	fi
else
	@true
endif

lint: venv
	$(VENV)/bin/ruff check pipeline jobs tests bench

test: venv test-tools lint
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

bench: venv
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf out .pytest_cache
