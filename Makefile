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

# tests/nemo runs in its own env (make test-nemo); its conftest would shadow tests/conftest.
test: $(STAMP)
	$(PY) -m pytest -q -m "not matrix and not slurm" $(PYTEST_ARGS) --ignore=tests/nemo tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-dist: $(STAMP)
	$(PY) -m pytest -q -m "not matrix" tests/dist

test-matrix: $(STAMP)
	$(PY) -m pytest -q -m matrix --ignore=tests/nemo tests

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

# The current NVIDIA stack (issue #20): .venv-latest with Python 3.12, torch 2.13.0 (the CUDA
# build, the only one served for 3.12; it runs on CPU), megatron-core 0.19.2 and
# Megatron-Bridge 0.6.2, pinned in requirements/latest.txt (which says why two packages go in
# without their dependencies). Python 3.12: $(PYTHON312) if set, else python3.12 on PATH,
# else the newest pyenv 3.12. test-latest runs a subset of the core tests there (every step
# phase and fault kind through ncl-launch on DP4/TP2/PP2, a lost node, the references equal
# to plain torchrun, a tier 3 rollback to a durable checkpoint, the megatron-core version
# check), then tests/bridge; the rest of the core suite runs on 0.16.1 in `make test`.
PYTHON312    ?=
VENV_LATEST  ?= .venv-latest
PY_LATEST    := $(VENV_LATEST)/bin/python
PIP_LATEST   := $(PY_LATEST) -m pip install -q --disable-pip-version-check
STAMP_LATEST := $(VENV_LATEST)/.installed
LATEST_CORE_TESTS ?= \
	"tests/e2e/test_recovery.py::test_every_phase_and_kind_recovers_exactly" \
	"tests/e2e/test_recovery.py::test_whole_node_lost_and_replaced" \
	"tests/e2e/test_recovery.py::test_commit_barrier_changes_nothing" \
	"tests/e2e/test_recovery.py::test_tier3_rolls_every_rank_back_to_the_disk_checkpoint" \
	tests/unit/test_megatron_versions.py

.PHONY: venv-latest test-latest

venv-latest: $(STAMP_LATEST)

$(STAMP_LATEST): pyproject.toml requirements/latest.txt
	@py="$(PYTHON312)"; \
	if [ -z "$$py" ]; then \
	  for c in python3.12 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
	    if "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "error: make venv-latest needs Python 3.12 (megatron-core 0.17+ requires it) and found none: install it (Ubuntu 24.04: apt-get install python3.12 python3.12-venv; elsewhere: pyenv install 3.12) or pass PYTHON312=/path/to/python3.12" >&2; \
	  exit 1; \
	fi; \
	echo "venv-latest: $$py"; \
	test -x $(PY_LATEST) || "$$py" -m venv $(VENV_LATEST)
	$(PIP_LATEST) torch==$$(sed -n 's/^torch==//p' requirements/latest.txt)
	$(PIP_LATEST) -r requirements/latest.txt
	$(PIP_LATEST) --no-deps $$(sed -n 's/^# no-deps: //p' requirements/latest.txt)
	$(PIP_LATEST) --no-deps --upgrade --only-binary=:all: --platform manylinux_2_39_x86_64 \
		--python-version 3.12 --target $$($(PY_LATEST) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
		$$(sed -n 's/^# no-deps-any-glibc: //p' requirements/latest.txt)
	$(PIP_LATEST) --no-deps -e .
	touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY_LATEST) -m pytest -q -p no:warnings $(PYTEST_ARGS) \
		$(LATEST_CORE_TESTS) tests/bridge

# The NeMo 2 and Megatron-Bridge front-ends through a real Slurm (issues #23, #24): sbatch of
# scripts/slurm/pretrain.sbatch with ENTRY=nemo (in .venv-nemo) and ENTRY=bridge (in
# .venv-latest), and NeMo-Run's SlurmExecutor with NclLaunch, each losing a rank and ending
# bit for bit as without the fault, on the single-node Slurm of local_cluster.sh. The batch
# script picks no venv by itself: the test names each one (NCL_VENV). Run after test-nemo
# and test-latest have built their venvs.
.PHONY: test-slurm-entries

test-slurm-entries: $(STAMP) $(STAMP_NEMO) $(STAMP_LATEST)
	bash scripts/slurm/local_cluster.sh start
	NCL_TEST_VENV_NEMO=$(abspath $(VENV_NEMO)) NCL_TEST_VENV_LATEST=$(abspath $(VENV_LATEST)) \
		$(PY) -m pytest -q -p no:warnings -m slurm $(PYTEST_ARGS) tests/e2e/test_slurm_entries.py

# Every declared megatron-core release (issue #20), one at a time, outside CI (time):
# `make test-megatron MCORE=0.17.1` builds .venv-mcore-0.17.1 from
# requirements/mcore-0.17.1.txt (its `# python: 3.x` line names the interpreter: $(PYTHON_MCORE)
# if set, else python3.x on PATH, else the newest pyenv 3.x) and runs the latest lane's core
# subset and tests/unit there. Releases with a file: ls requirements/mcore-*.txt. Results and
# timings: docs/bridge.md, "Version matrix". VENV_MCORE puts the env elsewhere.
MCORE        ?=
PYTHON_MCORE ?=
VENV_MCORE   ?= .venv-mcore-$(MCORE)
REQ_MCORE    := requirements/mcore-$(MCORE).txt
PY_MCORE     := $(VENV_MCORE)/bin/python
PIP_MCORE    := $(PY_MCORE) -m pip install -q --disable-pip-version-check
STAMP_MCORE  := $(VENV_MCORE)/.installed
MCORE_TESTS  ?= $(filter-out tests/unit/%,$(LATEST_CORE_TESTS)) tests/unit

ifneq ($(filter venv-megatron test-megatron,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(REQ_MCORE)),)
$(error MCORE=$(MCORE) has no pinned requirements file ($(REQ_MCORE)); pass one of: $(patsubst requirements/mcore-%.txt,MCORE=%,$(wildcard requirements/mcore-*.txt)) (0.16.1 runs in make test, 0.19.2 in make test-latest))
endif
endif

.PHONY: venv-megatron test-megatron

venv-megatron: $(STAMP_MCORE)

$(STAMP_MCORE): pyproject.toml $(REQ_MCORE)
	@want=$$(sed -n 's/^# python: //p' $(REQ_MCORE)); py="$(PYTHON_MCORE)"; \
	if [ -z "$$py" ]; then \
	  for c in python$$want $$(ls -d $$(pyenv root 2>/dev/null)/versions/$$want*/bin/python$$want 2>/dev/null | sort -rV); do \
	    if "$$c" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$$want')" 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then \
	  echo "error: megatron-core $(MCORE) is pinned for Python $$want ($(REQ_MCORE)) and none was found: install it (apt-get install python$$want python$$want-venv, or pyenv install $$want) or pass PYTHON_MCORE=/path/to/python$$want" >&2; \
	  exit 1; \
	fi; \
	echo "venv-megatron $(MCORE): $$py -> $(VENV_MCORE)"; \
	test -x $(PY_MCORE) || "$$py" -m venv $(VENV_MCORE)
	$(PIP_MCORE) torch==$$(sed -n 's/^torch==//p' $(REQ_MCORE))
	$(PIP_MCORE) -r $(REQ_MCORE)
	$(PIP_MCORE) --no-deps -e .
	touch $(STAMP_MCORE)

test-megatron: $(STAMP_MCORE)
	OMP_NUM_THREADS=1 $(PY_MCORE) -m pytest -q -p no:warnings $(PYTEST_ARGS) $(MCORE_TESTS)
