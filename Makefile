# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and install everything into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch on this platform. GPU users: create .venv and install
# your CUDA torch into it first (pip install torch ...); this pin is then skipped
# because a torch is already present.
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# `make test` also installs the experiment trackers (TensorBoard, MLflow, W&B: the extras of
# `.[trackers]`) so that their tests run rather than skip; `make demo` and the rest stay lean.
TRACKERS_STAMP := $(VENV)/.installed-trackers

.PHONY: demo test lint bench clean-venv experiment offline-study sweep-demo

# The project installs with -qq: errors still print, setuptools' notice that comes with every
# editable install does not.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install -qq -e ".[dev]"
	touch $(STAMP)

$(TRACKERS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -qq -e ".[dev,trackers]"
	touch $(TRACKERS_STAMP)

demo: $(STAMP)
	$(BIN)/babydistill run configs/demo.yaml

test: $(TRACKERS_STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline kernels stores workflows tests

experiment: $(STAMP)
	$(BIN)/babydistill run configs/cpu-experiment.yaml

offline-study: $(STAMP)
	$(BIN)/babydistill study configs/offline-study.yaml

# The demo run with a top-k store (teachers, store, the default student s1), a 16-trial sweep on 2 workers,
# then the best trial's configuration trained under its own name (the command the sweep's report gives)
# and evaluated; docs/results/sweep-demo/ holds the figures it made.
SWEEP_RUN := runs/sweep-demo
sweep-demo: $(STAMP)
	$(BIN)/babydistill run configs/sweep-demo.yaml
	$(BIN)/babydistill sweep configs/sweep-demo.yaml --name demo --workers 2
	PATH="$(abspath $(BIN)):$$PATH" sh -c "$$(grep '^babydistill distill ' $(SWEEP_RUN)/sweeps/demo/report.md)"
	$(BIN)/babydistill evaluate configs/sweep-demo.yaml --model $(SWEEP_RUN)/students/demo-best

clean-venv:
	rm -rf $(VENV)
