# The two commands of the README:
#   make demo  - set up everything (venv, wheels, interfaces, default model) and run a
#                localhost cluster that answers four robot clients at once
#   make test  - set up the same and run the whole test suite
# Both are idempotent: a second run repeats no set-up work.

VENV ?= .venv
PY := $(VENV)/bin/python
MDI := $(VENV)/bin/mdi-llm
PYTEST_ARGS ?=

.PHONY: setup model demo test test-fast plan bench peers clean

setup:
	@scripts/bootstrap.sh

model: setup
	@$(MDI) model prepare

demo: model
	@$(MDI) demo --config config/cluster.yaml

test: model
	@$(PY) -m pytest $(PYTEST_ARGS)

test-fast: model
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

plan: model
	@$(MDI) plan --config config/cluster.yaml

# Opt-in, never needed by `make test`: llama.cpp from the llama-cpp-python source package, the
# peer `mdi-llm bench --peers` measures the ring against (several minutes on 2 cores, once).
peers: setup
	@PY=$(PY) bash mdi_llm_ros/tools/bench/build_peers.sh

bench: peers
	@$(MDI) bench --peers --synthetic --secret --priority

clean:
	rm -rf build install log .pytest_cache
