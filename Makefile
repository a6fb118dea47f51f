# Two commands: `make run` (sets everything up, then serves) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXPORT_VENV := .cache/export-venv
DEMO_MODEL := models/smollm2-135m-instruct
PLUGINS := plugins/summarize plugins/translate plugins/classify
EXAMPLES := examples/sentiment examples/redact

.PHONY: install run test test-fast lint demo-model clean

install: $(VENV)/.installed demo-model .env

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) $(shell find $(EXAMPLES) -name '*.py' -o -name pyproject.toml)
	@echo "==> creating $(VENV) (server, built-in plugins, example third-party plugins, test tools)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' $(addprefix -e ,$(PLUGINS))
	@# The examples install the way a third party's package would: from their folders, not editable.
	$(BIN)/pip install -q --force-reinstall --no-deps $(addprefix ./,$(EXAMPLES))
	@touch $@

# Export tools (torch, optimum) live in their own environment: serving never imports them.
$(EXPORT_VENV)/.installed: constraints/export.txt
	@echo "==> creating $(EXPORT_VENV) (torch CPU + optimum, for building models; ~1.3 GB)"
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q --upgrade pip
	$(EXPORT_VENV)/bin/pip install -q torch==2.13.0 -c constraints/export.txt
	$(EXPORT_VENV)/bin/pip install -q "optimum[onnxruntime]" optimum-onnx transformers gguf accelerate pluggy msgspec -c constraints/export.txt
	@touch $@

# Always asks the exporter, which answers "up to date" in a fraction of a second when it is.
demo-model: $(EXPORT_VENV)/.installed
	@PYTHONPATH=core $(EXPORT_VENV)/bin/python -m ai_platform.export demo --out $(DEMO_MODEL)

# Development settings with freshly generated keys; never overwritten.
.env: | $(VENV)/.installed
	$(BIN)/ai-platform init-env --path .env --model $(notdir $(DEMO_MODEL))

run: install
	@$(BIN)/ai-platform keys --path .env
	$(BIN)/ai-platform serve

test: install
	AI_PLATFORM_EXPORT_PYTHON=$(CURDIR)/$(EXPORT_VENV)/bin/python $(BIN)/python -m pytest

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not demo_model and not slow"

lint: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/ruff check core plugins tests
	$(BIN)/ruff format --check core plugins tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache
