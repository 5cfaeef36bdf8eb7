# productvlm: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser demo test test-slow fuzz bench bench-gpu gpu-check lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch from the local wheel first, so nothing below pulls a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# Debian's chromium + chromedriver for the browser tests (report page, serving page); without root
# or apt-get those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium + chromium-driver for the browser tests (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "could not install chromium: the browser tests will skip"; \
	else echo "chromium/chromedriver missing and no root apt-get: the browser tests will skip"; fi

demo: install
	$(PY) -m productvlm.demo

# --hypothesis-profile=ci: derandomized property tests (tests/conftest.py), so a run never fails by chance.
test: install browser
	$(PY) -m pytest -q -m "not slow" --hypothesis-profile=ci

test-slow: install browser
	$(PY) -m pytest -q -m slow || test $$? -eq 5  # 5 = no slow tests collected

# A long random hypothesis search, outside CI (FUZZ_EXAMPLES per test, default 5000). Pin what it finds
# as an @example or a test so `make test` checks it from then on.
FUZZ_TESTS ?= tests/test_fuzz.py tests/test_parse.py tests/test_data_folder.py
fuzz: install
	$(PY) -m pytest -q -m "not slow" --hypothesis-profile=fuzz --hypothesis-show-statistics $(FUZZ_TESTS)

bench: install
	$(PY) -m bench.run

# The full-size model on one GPU (< 5 min on an H100): writes bench/results/gpu-*.json; without
# CUDA it prints why it skipped and exits 0.
bench-gpu: install
	$(PY) -m bench.bench_gpu

# Every GPU path once on the full-size model (< 8 min on an H100): memory plan vs peak, stage 1, train +
# eval, compiled eval/predict, warmed serve, merged export; a table + bench/results/gpu-check-*.json,
# exit 1 on a failed step; without CUDA it says so and exits 0.
gpu-check: install
	$(PY) -m bench.gpu_check

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache demo
