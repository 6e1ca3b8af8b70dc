# Two commands for a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
EXTRAS ?= dev,nudenet,eval,console

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

# Reinstall whenever pyproject.toml changes. torch==2.14.1 resolves from local disk here.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@command -v redis-server >/dev/null || (echo "installing redis-server" && \
		(apt-get install -y -q redis-server >/dev/null 2>&1 || sudo apt-get install -y -q redis-server))
	@# The console's browser tests: Debian's chromium and its driver (Selenium Manager never runs).
	@command -v chromedriver >/dev/null || (echo "installing chromium chromium-driver" && \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null) || \
		 sudo apt-get install -y -q chromium chromium-driver))
	touch $@

demo: install
	$(PY) -m worker.tools.samples demo --out .demo/images
	$(VENV)/bin/modgate scan .demo/images --output .demo/verdicts.jsonl

test: install
	$(VENV)/bin/ruff check .
	# The manual (docs/): a broken link or anchor fails the build.
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) bench/bench_core.py
	$(PY) bench/bench_clip.py
	$(PY) bench/bench_queue.py
	$(PY) bench/bench_cpu.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_scan_bomb.py
	$(PY) bench/bench_hashing.py
	$(PY) bench/bench_banks.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .demo .cache
