# mgdm: `make demo` runs the whole pipeline, `make test` the test suite.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
PROFILE ?=
PREFECT_PORT ?= 4200
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1

.PHONY: install demo test test-fast bench gpu-check serve mlflow-ui clean-outputs

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

## demo: dvc repro on params.yaml; PROFILE=<name>: a DVC experiment with profiles/<name>.yaml's values as
## `dvc exp run -S` overrides (params.yaml is left as it is; `dvc exp show` lists the run)
demo: install
	$(BIN)/mgdm repro $(if $(PROFILE),--profile $(PROFILE))
	$(BIN)/dvc metrics show

## test: the whole suite (closed-form maths, stages, dvc repro on the smoke profile, Prefect)
test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_core.py

## gpu-check: first thing to run on a GPU runner (CUDA, bf16, timed training and sampling, nccl DDP); exit 3 = no GPU
gpu-check: install
	$(BIN)/python scripts/gpu_check.py

## serve: a local Prefect server on 127.0.0.1 plus the pipeline deployment (Ctrl-C stops both)
serve: install
	PREFECT_HOME=$(abspath .prefect) $(BIN)/python -m flows.serve --port $(PREFECT_PORT)

## mlflow-ui: the MLflow UI on the store the stages log to: MLFLOW_TRACKING_URI when set (a database URI;
## an http(s) tracking server serves its own UI), else the project's mlruns.db
MLFLOW_PORT ?= 5000
mlflow-ui: install
	@uri="$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlruns.db)}"; \
	case "$$uri" in \
	  http://*|https://*) echo "MLFLOW_TRACKING_URI is the tracking server $$uri: open it, it serves the UI";; \
	  *) echo "mlflow ui on $$uri"; exec $(BIN)/mlflow ui --backend-store-uri "$$uri" --host 127.0.0.1 --port $(MLFLOW_PORT);; \
	esac
