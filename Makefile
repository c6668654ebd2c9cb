# onestep_bench. Every target that needs Python depends on `install`, so on a
# fresh machine `make bench METHOD=drifting` and `make test` work first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

METHOD  ?= drifting
DATASET ?= toy2d:8gaussians
SEED    ?= 0
NFE     ?=
EXP     ?=
SWEEP   ?=
ARGS    ?=
WORKDIR ?=
GUIDANCE ?=
NFE_FLAG = $(if $(NFE),--config.evals.main.nfe='($(NFE),)',)

.PHONY: help install install-parity data bench eval bench-all sweep campaign campaign-status leaderboard perf plan test test-slow lint clean

help:  ## Show this help.
	@echo "onestep_bench: one-step generative models, benchmarked side by side."
	@echo "  make bench METHOD=drifting [DATASET=toy2d:8gaussians SEED=0 NFE=1,2]"
	@echo "  make test"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN{FS=":.*## "}{printf "  %-12s %s\n", $$1, $$2}'

# Install stamps are keyed on content, not mtimes: each stamp file holds the
# sha256 of setup.cfg + pyproject.toml it was installed from, and a stamp whose
# key differs (or that is missing) is remade. A fresh clone (new mtimes, same
# files) reinstalls nothing; an edit of either file reinstalls, and says so.
INSTALL_KEY := $(shell cat setup.cfg pyproject.toml 2>/dev/null | \
  { command -v sha256sum >/dev/null && sha256sum || shasum -a 256; } | cut -c1-64)
PARITY_STAMP := $(VENV)/.installed-parity
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(INSTALL_KEY))
.PHONY: $(STAMP)
endif
ifneq ($(shell cat $(PARITY_STAMP) 2>/dev/null),$(INSTALL_KEY))
.PHONY: $(PARITY_STAMP)
endif

$(STAMP):
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found; install Python 3.11"; exit 1; }
	@echo "install: $(VENV) missing or setup.cfg / pyproject.toml changed (key $(INSTALL_KEY)); installing."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@echo $(INSTALL_KEY) > $@

install: $(STAMP)  ## Create the venv and install the package (idempotent).

# torch + torchvision + pytorch-fid (setup.cfg [parity]), for the Inception
# parity test and `make perf` only; never a runtime dependency. Keyed like
# $(STAMP); the order-only prerequisite installs the base first.
$(PARITY_STAMP): | $(STAMP)
	@echo "install-parity: [parity] extra missing or setup.cfg / pyproject.toml changed; installing."
	$(PY) -m pip install -q -e '.[test,parity]'
	@echo $(INSTALL_KEY) > $@

install-parity: $(PARITY_STAMP)  ## + the [parity] extra (torch, torchvision, pytorch-fid).

FASHION_DIR ?= /usr/share/datasets/fashion-mnist
data:  ## Install the offline datasets (Fashion-MNIST from Debian's dataset-fashion-mnist).
	@if ls $(FASHION_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST present in $(FASHION_DIR)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
	  || { echo "error: could not install dataset-fashion-mnist; copy the 4 IDX files into a dir and pass ARGS=--config.data.dir=DIR"; exit 1; }; \
	fi
	@echo "digits: bundled with scikit-learn (nothing to do)"

BENCH_DEPS = install $(if $(filter fashion_mnist,$(DATASET)),data)
# Distillation methods name their teacher (methods/<m>.py: TEACHER_METHOD);
# `make bench` trains it first (same dataset, seed and protocol) if absent.
TEACHER = $(shell $(PY) -c "import methods.$(METHOD) as m; print(getattr(m, 'TEACHER_METHOD', ''))" 2>/dev/null)
TEACHER_DIR = runs/$(TEACHER)/$(subst :,_,$(DATASET))/bench_seed$(SEED)
bench: $(BENCH_DEPS)  ## Train + evaluate METHOD on DATASET, record results and plots.
	@if [ -n "$(TEACHER)" ] && [ ! -f "$(TEACHER_DIR)/summary.json" ]; then \
	  echo "Training the $(TEACHER) teacher first: $(TEACHER_DIR)"; \
	  $(MAKE) --no-print-directory bench METHOD=$(TEACHER) DATASET=$(DATASET) SEED=$(SEED) NFE= ARGS= || exit 1; \
	fi
	$(PY) -m onestep_bench.main \
	  --config=experiments/bench.py:method=$(METHOD),dataset=$(DATASET),seed=$(SEED) \
	  $(NFE_FLAG) $(ARGS)

# Re-score a finished run (no training): its rows keep the run's protocol.
eval: install  ## Re-evaluate a finished run: make eval WORKDIR=runs/... [NFE=1,4 GUIDANCE=1.5 ARGS=...]
	@test -n "$(WORKDIR)" || { echo "usage: make eval WORKDIR=<run dir with summary.json> [NFE=1,4] [GUIDANCE=a]"; exit 2; }
	$(PY) -m onestep_bench.evaluate --workdir=$(WORKDIR) \
	  $(if $(NFE),--nfe=$(NFE),) $(if $(GUIDANCE),--guidance=$(GUIDANCE),) $(ARGS)

bench-all: install  ## `make bench` for every method in methods/.
	@for m in $$($(PY) -c "from onestep_bench.method import available_methods as a; print(*a())"); do \
	  $(MAKE) --no-print-directory bench METHOD=$$m DATASET=$(DATASET) SEED=$(SEED) || exit 1; \
	done

sweep: install  ## Run sweeps SWEEP (comma list) of experiments/EXP.py.
	@test -n "$(EXP)" -a -n "$(SWEEP)" || { echo "usage: make sweep EXP=<file in experiments/> SWEEP=<name>[,<name>]"; exit 2; }
	$(PY) -m onestep_bench.sweeps --exp=$(EXP) --sweep=$(SWEEP) $(ARGS)

leaderboard: install  ## Regenerate results/leaderboard/*.csv, LEADERBOARD.md, plots.
	$(PY) -m onestep_bench.results --results_dir results

# The seeded boards as one declared step list (experiments/campaign.py);
# state = results/, so it resumes anywhere. One `make campaign` per core.
campaign: install data  ## Run the missing steps of the ranked boards [ARGS=--only=digits].
	OPENBLAS_NUM_THREADS=1 $(PY) -m experiments.campaign run $(ARGS)

campaign-status: install  ## What the ranked boards still need, in CPU-hours.
	$(PY) -m experiments.campaign status $(ARGS)

# Speed / memory ratios measured side by side (experiments/perf.py); pytorch-fid
# is the evaluator's baseline. Subsets: ARGS="--sections=methods --backbones=unet".
perf: install-parity data  ## Benchmark -> results/perf.csv + results/perf.md.
	OPENBLAS_NUM_THREADS=1 $(PY) -m experiments.perf $(ARGS)

# Paper-scale protocols compiled ahead of time on a simulated 8-device CPU
# mesh (no data, nothing trained) -> results/plan.csv + results/plan.md.
# CPU-heavy (tens of minutes for all); a subset:
# ARGS="--protocols=meanflow/imagenet256_latent@B/2,equal_budget:tvm --nofit".
plan: install  ## Compile every paper protocol, project FLOPs / memory / chip-hours.
	OPENBLAS_NUM_THREADS=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  JAX_PLATFORMS=cpu $(PY) -m onestep_bench.plan --out=results/plan $(ARGS)

# Two pytest-xdist workers (one per CI core; --dist loadfile keeps a test
# file's module fixtures in one worker). TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
TEST_PAR = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: install-parity  ## Fast tests incl. pytorch-fid parity (CI runs this).
	$(PY) -m pytest -q -m "not slow" $(TEST_PAR) $(ARGS)

test-slow: install-parity data  ## Slow tests only.
	$(PY) -m pytest -q -m slow $(ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no slow tests collected"; exit 0; fi; exit $$rc

lint: install  ## ruff.
	$(VENV)/bin/ruff check onestep_bench methods experiments tests

clean:  ## Remove the venv, run dirs and caches (results/ is kept).
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
