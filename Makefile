# `make study` runs the default comparison; `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STORE := $(CURDIR)/mlruns

.PHONY: setup study test ui params benchmark clean-outputs

# The torch backend's optional extra, where PyTorch's CPU build lies on this machine's disk (pip's find-links
# takes it from there); elsewhere PyPI's Linux wheel is a CUDA build of several GB (README, Backends) and the
# torch tests skip. make setup EXTRAS=test,torch installs it anyway.
comma := ,
EXTRAS ?= test$(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),$(comma)torch)

setup: $(VENV)/.installed

# Two commands at once on a fresh clone (make study and make test in two terminals) take turns to set up:
# pip installing into one venv twice at once breaks it. The one that waited finds it set up and goes on.
ifdef SETUP_LOCKED
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# -qq: errors only (a machine's pip configuration can add a warning per package, e.g. for index folders
	@# that do not exist). setuptools warns on every editable install that same-named folders in the working
	@# directory may shadow the package; this project runs from its root, so that notice is held back too.
	$(PY) -m pip install -qq --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -qq -e ".[$(EXTRAS)]"
	touch $@
else
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c "import fcntl, subprocess, sys; lock = open('$(VENV).lock', 'a'); fcntl.flock(lock, fcntl.LOCK_EX); \
		sys.exit(subprocess.call(['$(MAKE)', '--no-print-directory', 'SETUP_LOCKED=1', '$@']))"
endif

# The default studies: the course note's two examples, three formulations x 5 seeds each, each with its report.
# One command runs both in turn: the second reuses the first's worker processes, TensorFlow already imported.
study: setup
	$(PY) -m pipeline.run -m experiment=seed_mnist,seed_logistic

test: setup
	$(PY) -m pytest

# The MLflow UI on the local store (make ui UI_PORT=5001 for another port). Its background job workers
# serve GenAI features this project does not use.
# UI_PORT reaches the check through the environment, never as code: any value is named, none is run.
UI_PORT ?= 5000
export UI_PORT
ui: setup
	@$(PY) -c "import os, socket, sys; port = os.environ['UI_PORT']; \
		problem = ('is not accepted: expected a port number in 1..65535' if not (port.isdigit() and 0 < int(port) < 65536) \
		           else 'is in use; run make ui UI_PORT=<another port>' if socket.socket().connect_ex(('127.0.0.1', int(port))) == 0 \
		           else None); \
		problem and print(f'error: UI_PORT={port!r} {problem}', file=sys.stderr); sys.exit(2 if problem else 0)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(PY) -m mlflow ui --backend-store-uri sqlite:///$(STORE)/mlflow.db \
		--default-artifact-root $(STORE)/artifacts --host 127.0.0.1 --port $(UI_PORT)

# Removes what the pipeline wrote besides the store (mlruns/) and the data: its folders in outputs/ (run and sweep
# folders, checkpoints of unfinished runs, DVC's outputs, JAX's compilation cache, the browser test's screenshots)
# and the report folders it made (those holding its marker file). Anything else in outputs/ or reports/ stays, and
# so does the folder then.
PIPELINE_OUTPUTS := runs multirun checkpoints dvc jax-cache screenshots
clean-outputs:
	rm -rf $(addprefix outputs/,$(PIPELINE_OUTPUTS))
	@rmdir outputs 2>/dev/null || true
	@for folder in reports/*/; do if [ -f "$$folder.fromlogits-report" ]; then rm -rf "$$folder"; fi; done; \
		rmdir reports 2>/dev/null || true

# Training speed: the note's model.fit vs the pipeline's loop, side by side (a few minutes).
benchmark: setup
	$(PY) benchmarks/train_throughput.py

# params.yaml (what DVC stages read) from conf/, with DVC's own Hydra composer; run after editing conf/.
params: setup
	$(PY) -m pipeline.dvc_stages params
