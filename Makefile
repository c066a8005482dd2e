# Two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.installed

.PHONY: venv sysdeps test lint docs demo demo-qat clean

venv: $(STAMP)

# Reinstall whenever the project's metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt $(wildcard examples/bittts/pyproject.toml)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test,docs]"
	if [ -f examples/bittts/pyproject.toml ]; then $(PIP) install -q -c constraints.txt -e "examples/bittts[eval,peer,train,publish]"; fi
	$(BIN)/python -c "from ternq import native; native.main([])"
	touch $(STAMP)

# Debian tools the BitTTS example shells out to (flite voice, espeak-ng phonemes, sox).
sysdeps:
	@missing=""; for t in flite espeak-ng sox; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: venv
	$(BIN)/ruff check .

test: venv sysdeps lint
	$(BIN)/python -m pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The shipped 1.58-bit BitTTS model speaks a sentence to demo.wav (size, real-time factor, pocketsphinx transcript).
demo: venv sysdeps
	$(BIN)/bittts demo -o demo.wav

# ternq on its own: 300 ternary QAT steps on a small conv net, then save_packed / load_packed.
demo-qat: venv
	$(BIN)/python -m ternq.demo

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis
