# Set-up and the two entry points: `make demo` (the real pipeline on a tiny model, CPU) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test lint clean

# torch==2.13.0 is the CPU build on these machines; an existing torch (e.g. a CUDA build on a GPU box) is kept.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

demo: install
	bash scripts/demo.sh

# One torch thread per test worker: two workers on two cores with two spinning threads each ran ~20x slower.
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist loadfile

lint:
	$(PYTHON) -m ruff check pgolf stages tests benchmarks scripts

clean:
	rm -rf artifacts/demo .pytest_cache
