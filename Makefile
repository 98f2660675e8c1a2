# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases this machine's pip takes from local disk;
# any other pip installs whatever torch the index offers.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

# A first install needs room: torch 2.14.1 for x86-64 is a CUDA build, about 6.6 GB of .venv in all.
NEED_GIB := 8
DISK_CHECK := import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(NEED_GIB) else f'make: {free:.1f} GiB free here; a first install needs about $(NEED_GIB) GiB (torch is a CUDA build). Free some space and rerun.')

$(STAMP): pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(PY) -c "$(DISK_CHECK)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/maskless run --config examples/demo.yaml

# Two pytest-xdist workers, whole files each (most tests wait on Ray, servers or subprocesses); the slow
# tests (pyproject's markers) only in test-all.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(BIN)/maskless bench

clean:
	rm -rf $(VENV) demo-out runs
