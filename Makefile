# Two commands set everything up from nothing: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-faults bench quality world-base judge clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: its CPU wheel is on local disk; a bare `torch` pulls a multi-GB CUDA build
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/palp-sweep recipes/world_demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# killed workers, Ctrl-C, a killed driver, divergence, an MLflow outage: docs/faults.md
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

bench: $(STAMP)
	$(BIN)/python benchmarks/step_bench.py --tiny

# the committed world base and judge are what these write; rerunning continues from runs/world-pretrain
world-base: $(STAMP)
	$(BIN)/python -m palp_trainer.world_base palp_trainer/assets/world --work runs/world-pretrain

judge: $(STAMP)
	$(BIN)/python -m palp_trainer.judge palp_trainer/assets/judge.safetensors

quality: $(STAMP)
	$(BIN)/python benchmarks/quality_bench.py judge
	$(BIN)/python benchmarks/quality_bench.py base
	$(BIN)/python benchmarks/quality_bench.py table2

clean:
	rm -rf $(VENV) runs
