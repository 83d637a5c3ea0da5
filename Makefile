# The two commands a fresh machine needs:  make demo  and  make test.
# Each creates .venv if missing, installs torch first at the version pinned in
# constraints.txt (the CPU wheel; an unpinned torch would pull several GB of CUDA packages),
# then netshrink with its dev extras under the same constraints, and Debian's
# dataset-fashion-mnist when it is absent. CI (.ci/run) runs `make lint` and `make test`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.netshrink-installed
CONSTRAINTS := constraints.txt
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench sweep-demo data install

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,plot]"
	touch $(STAMP)

data:
	@test -f $(FMNIST) || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: install data
	$(VENV)/bin/netshrink demo

test: install data
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

# Every method at x4, x8, x16 on ResNet-20 / Fashion-MNIST, post-training, on 2,000 test
# images: a table, runs/sweep-demo/pareto.png and report.html (resumable: re-running skips
# finished cells).
SWEEP := --model resnet20 --data fashion-mnist --methods all --targets x4,x8,x16
sweep-demo: install data
	nice $(VENV)/bin/netshrink sweep $(SWEEP) --subset-test 2000 --out-dir runs/sweep-demo

# Regenerates the benchmark results BENCHMARKS.md's sweep sections print: the sweeps (ResNet-20
# on the same 2,000 test images as sweep-demo; EfficientNet-Lite0 on the evaluation photos),
# copied to benchmarks/results/ with their Pareto plots, and their markdown tables.
bench: install data
	$(PY) benchmarks/kmeans_fashion_mnist.py
	nice $(VENV)/bin/netshrink sweep $(SWEEP) --subset-test 2000 \
		--out-dir runs/bench/sweep_resnet20_fashion_mnist
	$(PY) benchmarks/sweep_table.py --publish runs/bench/sweep_resnet20_fashion_mnist \
		sweep_resnet20_fashion_mnist
	nice $(PY) benchmarks/sweep_efficientnet.py
