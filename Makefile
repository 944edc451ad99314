# One-command entry points. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := true
# DVC reads its own switch (not DO_NOT_TRACK): .dvc/config turns analytics off inside this repo,
# but the test suite runs some dvc command outside it (CI runs left 5–7 report files each in
# /tmp, none with this set), which starts a daemon that tries to report home.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
# Stage commands in dvc.yaml call `python` and `dvc`: the venv's, without activating it.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv run test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[cpu,test]"
	touch $(STAMP)

run: venv
	$(VENV)/bin/cpcsam run

# two xdist workers, one test file each at a time (tests/conftest.py queues the long files first);
# TEST_WORKERS=0 runs everything in this one process
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# every performance target measured back to back in one run (~20 min on 2 cores; after `make run`)
.PHONY: bench
bench: venv
	$(PY) benchmarks/bench_all.py

.PHONY: reliability
reliability: venv  ## the fault-injection tests behind docs/RELIABILITY.md
	$(PY) -m pytest tests/orchestration/test_retrain_reliability.py tests/data/test_storage_outage.py \
	  tests/orchestration/test_batch_predict.py tests/training/test_checkpoint.py tests/orchestration/test_stages.py \
	  tests/training/test_distributed.py tests/training/test_components.py tests/orchestration/test_stack_lifecycle.py \
	  tests/orchestration/test_flows.py tests/data/test_data_ids_links_reports.py tests/export/test_onnx_export.py \
	  tests/export/test_parity.py tests/test_hostile_inputs.py tests/orchestration/test_secrets.py \
	  tests/orchestration/test_end_to_end.py

# ---- the shipped starting SAM (checkpoints/README.md): two phases on one CPU thread, ~2.5 h, resumable.
# Phase 1 from random weights with the class-balanced loss; phase 2 from phase 1 with the calibrated
# BCE + Dice loss on new scenes (seed 1). Same command, same bytes.
.PHONY: generalist
GENERALIST_WORK ?= .pretrain-work
PHASE3_STEPS := 3000
PHASE3_MIN_RADIUS := 0.015
PRETRAIN_CPU := -S model.checkpoint=null -S pretrain.threads=1 -S pretrain.device=cpu \
	-S pretrain.val_every=250 -S pretrain.checkpoint_every=250
generalist: venv
	$(PY) -m cpcsam.training.pretrain --params params.yaml --out $(GENERALIST_WORK)/phase1.pth \
	  --work $(GENERALIST_WORK)/phase1 $(PRETRAIN_CPU) -S model.sizes.small.mask_refine_stages=0 -S pretrain.steps=8000
	$(PY) -m cpcsam.training.pretrain --params params.yaml --out $(GENERALIST_WORK)/phase2.pth \
	  --work $(GENERALIST_WORK)/phase2 $(PRETRAIN_CPU) -S model.sizes.small.mask_refine_stages=0 -S pretrain.steps=4000 \
	  -S pretrain.seed=1 -S pretrain.init=$(GENERALIST_WORK)/phase1.pth -S pretrain.mask_loss=bce_dice -S pretrain.optim.lr=1e-3
	$(PY) -m cpcsam.training.pretrain --params params.yaml --out checkpoints/sam_small_generalist.pth \
	  --work $(GENERALIST_WORK)/phase3 $(PRETRAIN_CPU) -S pretrain.steps=$(PHASE3_STEPS) -S pretrain.seed=2 \
	  -S pretrain.init=$(GENERALIST_WORK)/phase2.pth -S pretrain.mask_loss=bce_dice -S pretrain.optim.lr=5e-4 \
	  -S 'pretrain.object_radius=[$(PHASE3_MIN_RADIUS),0.38]'

# ---- local stack (issue 5): S3 (moto_server), MLflow server, Prefect server + worker on 127.0.0.1
.PHONY: stack-up stack-down stack-status train-flow retrain-flow
stack-up: venv  ## start the stack, register infra/prefect.yaml deployments; logs in .infra/logs
	$(PY) infra/stack.py up

stack-down:  ## stop everything stack-up started (by PID file)
	$(PY) infra/stack.py down

stack-status:
	$(PY) infra/stack.py status

train-flow: venv  ## one `train` flow run on the stack: make train-flow PROFILE=tiny
	eval "$$($(PY) infra/stack.py env)" && $(VENV)/bin/prefect deployment run train/oceancoco --param profile=$(or $(PROFILE),oceancoco) --watch

retrain-flow: venv  ## one tick of the S3 watcher now (it also runs every 6 h on the stack)
	eval "$$($(PY) infra/stack.py env)" && $(VENV)/bin/prefect deployment run retrain/deepsea-watch --watch

# ---- serving (issue 10): a registered version behind MLflow's scoring server, on 127.0.0.1 only
# make serve PROFILE=tiny [ALIAS=champion] [SERVE_PORT=5001] [SERVE_WORKERS=1] [TRACKING_URI=sqlite:///mlflow.db]
# Registry: TRACKING_URI, else $$MLFLOW_TRACKING_URI, else the local stack's (`make stack-up`).
# Request/answer format: operations/pyfunc.py; CPCSAM_SERVE_DEVICE=cpu|cuda, CPCSAM_SERVE_THREADS=N.
.PHONY: serve
SERVE_PORT ?= 5001
SERVE_WORKERS ?= 1
serve: venv  ## POST /invocations with {"dataframe_split": {"columns": ["image", "prompts"], ...}}
	$(if $(or $(TRACKING_URI),$(MLFLOW_TRACKING_URI)),export MLFLOW_TRACKING_URI="$(or $(TRACKING_URI),$(MLFLOW_TRACKING_URI))",eval "$$($(PY) infra/stack.py env)") && \
	$(VENV)/bin/mlflow models serve -m "models:/cpcsam-$(or $(PROFILE),oceancoco)@$(or $(ALIAS),champion)" \
	  --env-manager local -h 127.0.0.1 -p $(SERVE_PORT) -w $(SERVE_WORKERS)

clean:
	rm -rf $(VENV) .pytest_cache
