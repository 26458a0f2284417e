# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install everything into it, at the versions of requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
# The CPU build of torch on this platform, and the triton that torch 2.13 pairs with (torch, triton and the
# CUDA wheels stay out of the lock). GPU users: create .venv and install your CUDA torch into it first
# (python3 -m venv .venv && .venv/bin/pip install torch ...); these pins are then skipped because a torch is
# already present, and the lock leaves that torch and its triton alone.
TORCH_CPU ?= torch==2.13.0 triton==3.7.1
PIP_PIN   := pip==26.3
UV_PIN    := uv==0.13.9
STAMP  := $(VENV)/.installed
INSTALL = $(BIN)/python -m pip install -qq -c $(LOCK) -e ".[dev,trackers]"

.PHONY: demo test test-latest lock install lint bench clean-venv experiment offline-study claim-study vocab-study sweep-demo docs

# The project installs with -qq: errors still print, setuptools' notice that comes with every editable install
# does not. One environment for demo and test: the dev tools and the experiment trackers (TensorBoard, MLflow,
# W&B: the extras of `.[trackers]`, so that their tests run rather than skip) come with it.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) tools/lockfile.py python-ok
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP_PIN)"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet -c $(LOCK) $(TORCH_CPU)
	$(INSTALL)
	touch $(STAMP)

# Every run checks .venv against the lock (a fraction of a second): a package upgraded by hand is put back,
# never run against silently.
install: $(STAMP)
	@$(BIN)/python tools/lockfile.py check $(LOCK) || { $(INSTALL) && $(BIN)/python tools/lockfile.py check $(LOCK); }

demo: install
	$(BIN)/babydistill run configs/demo.yaml

# mkdocs-material prints its end-of-life notice (May 2027; docs/development.md, 'The docs') on every build:
# said once there, not in every `make test`.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

# The docs build first, with --strict: a broken link, a missing anchor or a page left out of mkdocs.yml's nav
# fails the suite before pytest starts (a few seconds).
test: install
	$(MKDOCS) build --strict --quiet
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

# The docs site (mkdocs.yml; the pages are docs/*.md) into site/; open site/index.html, or serve it live
# with `.venv/bin/mkdocs serve`.
docs: install
	$(MKDOCS) build --strict

# The canary: a throwaway environment with the newest versions pyproject.toml allows (torch stays the platform's
# CPU pin: a newer one is a multi-GB CUDA build here), then the whole suite. Run it before `make lock`, and
# whenever a dependency releases; it prints which versions differ from the lock.
LATEST := .venv-latest
test-latest:
	@$(PYTHON) tools/lockfile.py python-ok
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet "$(firstword $(TORCH_CPU))"
	$(LATEST)/bin/python -m pip install -qq -e ".[dev,trackers]"
	$(LATEST)/bin/python tools/lockfile.py diff $(LOCK)
	NO_MKDOCS_2_WARNING=1 $(LATEST)/bin/mkdocs build --strict --quiet --site-dir $(LATEST)/site
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q

# Move the lock forward: resolve the newest versions pyproject.toml allows (for Python 3.11+, every platform),
# with torch held at the CPU pin so that its pure-Python dependencies match it; then `make test`.
lock: install
	$(BIN)/python -m pip install --quiet "$(UV_PIN)"
	echo "$(firstword $(TORCH_CPU))" > $(VENV)/torch-pin.txt
	UV_PYTHON_DOWNLOADS=never $(BIN)/uv pip compile pyproject.toml --extra dev --extra trackers --universal \
		--python-version 3.11 --upgrade --quiet -c $(VENV)/torch-pin.txt -o $(VENV)/lock-raw.txt
	$(BIN)/python tools/lockfile.py filter $(VENV)/lock-raw.txt $(LOCK)

lint: install
	$(BIN)/ruff check pipeline kernels stores workflows tests tools analysis

experiment: install
	$(BIN)/babydistill run configs/cpu-experiment.yaml

offline-study: install
	$(BIN)/babydistill study configs/offline-study.yaml

# The claim study (docs/results/claim/PROTOCOL.md): hours of CPU; two models at once, then the report.
# The committed results.json carries the cells an earlier machine finished (`--carry`, docs/sweeps-and-studies.md).
CLAIM_CARRY = $(if $(wildcard docs/results/claim/results.json),--carry docs/results/claim/results.json)
claim-study: install
	$(BIN)/babydistill study configs/claim-study.yaml --jobs 2 $(CLAIM_CARRY)
	$(BIN)/babydistill study configs/claim-study.yaml --report-only --out docs/results/claim $(CLAIM_CARRY)

# Issue 27 at V = 16,000 (docs/results/store-study/vocab16k/PROTOCOL.md): hours of CPU, carried like the claim study.
VOCAB_CARRY = $(if $(wildcard docs/results/store-study/vocab16k/results.json),--carry docs/results/store-study/vocab16k/results.json)
vocab-study: install
	$(BIN)/babydistill study configs/vocab-study.yaml --jobs 2 $(VOCAB_CARRY)
	$(BIN)/babydistill study configs/vocab-study.yaml --report-only --out docs/results/store-study/vocab16k $(VOCAB_CARRY)

# The demo run with a top-k store (teachers, store, the default student s1), a 16-trial sweep on 2 workers,
# then the best trial's configuration trained under its own name (the command the sweep's report gives)
# and evaluated; docs/results/sweep-demo/ holds the figures it made.
SWEEP_RUN := runs/sweep-demo
sweep-demo: install
	$(BIN)/babydistill run configs/sweep-demo.yaml
	$(BIN)/babydistill sweep configs/sweep-demo.yaml --name demo --workers 2
	PATH="$(abspath $(BIN)):$$PATH" sh -c "$$(grep '^babydistill distill ' $(SWEEP_RUN)/sweeps/demo/report.md)"
	$(BIN)/babydistill evaluate configs/sweep-demo.yaml --model $(SWEEP_RUN)/students/demo-best

clean-venv:
	rm -rf $(VENV) $(LATEST)
