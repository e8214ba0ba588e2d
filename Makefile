# The two commands the README promises: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test venv test-deps lint bench clean

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing substituter with its test extra"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/substituter daemon $(if $(CONFIG),--config $(CONFIG))

test-deps:
	./scripts/install-test-deps.sh

test: venv test-deps lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check substituter fetchers tests bench plugins
	$(VENV)/bin/mypy substituter fetchers

bench: venv
	$(VENV)/bin/python bench/nar_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
