# The two commands of the README. Each sets up everything it needs on first use, on a fresh machine:
#   make quickstart   the embedded default: synthetic data, tiny bases, stage 1 + stage 2, held-out accuracy
#   make test         the test suite CI runs (slow tests excluded), Debian's Chromium for the browser tests included
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# pip's own notices (and this machine's index settings) are not for the user: -qq keeps errors only.
PIP := $(PY) -m pip install -qq --disable-pip-version-check
# llama-cpp-python (the GGUF tests' runtime) is built from its sdist here: CPU only, its mtmd library included.
LLAMA_CMAKE_ARGS ?= -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=ON

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): CPU PyTorch, then this repo's dependencies, llama.cpp compiled for the GGUF tests"
	@echo "(first run only: about 1.5 minutes, plus several for compiling llama.cpp)"
	@python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) "$(TORCH)"
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) -e ".[dev]"
	@$(PY) -c "import llama_cpp.mtmd_cpp" || { echo "llama-cpp-python was built without its mtmd library"; exit 1; }
	@touch $@

install: $(VENV)/.installed

# The browser tests drive Debian's Chromium through Playwright: Playwright's own browser download needs the open
# internet, Debian's package does not. Installed once, as root or through sudo.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  echo "installing Debian's chromium for the browser tests"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

quickstart: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) quickstart.py

test: $(VENV)/.installed chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

.PHONY: install chromium quickstart test lint
