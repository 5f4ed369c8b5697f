# `make demo` and `make test` set themselves up on a fresh machine (a virtualenv in .venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean mutate

$(STAMP): pyproject.toml install.sh
	bash install.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/vidbatch demo --output demo-out

# The suite in TEST_WORKERS parallel processes, each taking whole test files (module fixtures such as a Ray
# cluster or the SLURM daemons start once per file). More workers than the 2 cores of CI pays: many tests wait
# on clusters, subprocesses and timeouts rather than compute. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Mutation testing of the engine's core with mutmut, module by module: slow, so not part of `make test`
# or CI (docs/TESTING.md). `make mutate MODULES="ddim commit"` tests some modules only; the modules,
# their files and their tests are in pyproject.toml ([tool.vidbatch.mutate]). Scores and the mutants
# not killed go to mutation-report.txt; mutmut's work is kept in build/mutate/. MUTATE_CHILDREN mutants are
# tested at once (1: the machine may be shared; 2 on an idle 2-core machine).
MODULES ?= merge vidtome processors ddim commit cache controls tokenflow vid2vid_zero videodirector baselines
MUTATE_CHILDREN ?= 1

mutate: $(STAMP)
	$(BIN)/python tests/mutation/mutate.py --children $(MUTATE_CHILDREN) $(MODULES)

clean:
	rm -rf $(VENV) demo-out .pytest_cache build/mutate mutation-report.txt
