# Two commands do all set-up on a fresh machine (see README):
#   make demo   run ComfyUI headless with the pack and write an image to out/
#   make test   lint, format check, type check, then the whole test suite in a real ComfyUI
# The browser tests need Debian's chromium: `make browser` installs it (as root; .ci/run does it first).
# `make workflows` rebuilds example_workflows/ through the real frontend.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Small CPU convolutions run ~100x slower with 2 threads on 2-core machines (shared/HOST.md).
export OMP_NUM_THREADS := 1

.PHONY: test demo lint comfyui clean browser workflows evidence

$(STAMP): requirements-test.txt scripts/torchvision_shim.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(if $(wildcard /opt/wheels),--find-links /opt/wheels) -r requirements-test.txt
	@# PyPI's torchvision cannot load next to CPU torch: install the import shim only where it is needed.
	@if ! $(BIN)/python -c "import torchvision" 2>/dev/null; then \
	  site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  cp scripts/torchvision_shim.py $$site/tl_torchvision_shim.py; \
	  echo "import tl_torchvision_shim; tl_torchvision_shim.install()" > $$site/tl_torchvision_shim.pth; \
	  $(BIN)/python -c "import torchvision" && echo "torchvision shim installed"; fi
	touch $(STAMP)

comfyui: $(STAMP)
	@$(BIN)/python scripts/comfyui_tree.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy samplers guidance

test: comfyui browser lint
	$(BIN)/python -m pytest

demo: comfyui
	$(BIN)/python scripts/demo.py

browser:
	bash scripts/browser_setup.sh

evidence: comfyui
	$(BIN)/python bench/evidence.py

workflows: comfyui
	PYTHONPATH=scripts $(BIN)/python scripts/example_workflow_builder.py

clean:
	rm -rf $(VENV) .cache out
