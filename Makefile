# Two commands do all set-up: `make demo` (main job) and `make test` (the tests).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test models lint format bench eval clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/vlsearch demo $(if $(DATA),--data-root $(DATA))

test: install
	$(VENV)/bin/ruff check src tests
	PYTHONPATH=src $(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q

models: install
	$(VENV)/bin/vlsearch train all

eval: install
	$(VENV)/bin/vlsearch eval --suite $(if $(DATA),--data-root $(DATA)) $(foreach g,$(GALLERIES),--gallery $(g))

bench: install
	$(VENV)/bin/vlsearch bench --out bench-out

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	PYTHONPATH=src $(VENV)/bin/lint-imports
	$(VENV)/bin/python scripts/import_cycles.py

format: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests
