# simclr-embed — every target sets itself up; nothing needs installing by hand first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test lint proto bench venv clean

venv: $(STAMP)

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[all,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Regenerate the committed gRPC stubs from proto/ (tests check they are current).
proto: $(STAMP)
	$(PY) -m server.pb.generate

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
