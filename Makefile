# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if
# missing and installs the project with versions pinned in requirements/pins.txt (and,
# best effort, tcmalloc for CPU rehearsal: scripts/install_allocator.sh).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-unit test-dist test-matrix test-slurm venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/pins.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==$$(sed -n 's/^torch==//p' requirements/pins.txt)
	$(PIP) install -q --disable-pip-version-check -c requirements/pins.txt -e '.[test,bench]'
	bash scripts/install_allocator.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not matrix and not slurm" $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-dist: $(STAMP)
	$(PY) -m pytest -q -m "not matrix" tests/dist

test-matrix: $(STAMP)
	$(PY) -m pytest -q -m matrix tests

test-slurm: $(STAMP)
	bash scripts/slurm/local_cluster.sh start
	$(PY) -m pytest -q -m slurm tests/e2e/test_slurm.py

clean:
	rm -rf $(VENV) outputs .pytest_cache

# NeMo 2 adapters (issue #6): their own env, .venv-nemo, from requirements/nemo.txt.
VENV_NEMO  ?= .venv-nemo
PY_NEMO    := $(VENV_NEMO)/bin/python
STAMP_NEMO := $(VENV_NEMO)/.installed

.PHONY: venv-nemo test-nemo

venv-nemo: $(STAMP_NEMO)

$(STAMP_NEMO): pyproject.toml requirements/nemo.txt
	test -x $(PY_NEMO) || $(PYTHON) -m venv $(VENV_NEMO)
	$(PY_NEMO) -m pip install -q --disable-pip-version-check torch==$$(sed -n 's/^torch==//p' requirements/nemo.txt)
	$(PY_NEMO) -m pip install -q --disable-pip-version-check -r requirements/nemo.txt
	$(PY_NEMO) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP_NEMO)

test-nemo: $(STAMP_NEMO)
	OMP_NUM_THREADS=1 $(PY_NEMO) -m pytest -q -p no:warnings $(PYTEST_ARGS) tests/nemo
