# Two commands set everything up from nothing: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-faults test-cluster bench quality world-base judge mutation clean

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

# several Ray nodes on this machine, S3 on 127.0.0.1, an MLflow server with S3 artifacts: docs/cluster.md
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

bench: $(STAMP)
	$(BIN)/python benchmarks/step_bench.py --tiny

# Mutation testing of the objective (docs/mutation.md): files in pyproject's [tool.mutmut]; the score counts
# losses.py and the loss code of task.py (the step, its UNet branches, the batch's noise and t), not the
# CUDA-graph, autocast and FastPaths plumbing. ~30 min on 2 cores.
MUTATE := 'palp_trainer.objective.losses.*' \
	$(foreach f,draw_batch aligns_at as_eps alignment_score,'palp_trainer.objective.task.x_$(f)__*') \
	'palp_trainer.objective.task.x*PalpModel*forward__*' \
	$(foreach f,training_step loss_terms alignment_branch pretrained folded personalized,\
	'palp_trainer.objective.task.x*PalpTask*$(f)__*')

mutation: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,mutation]'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 $(MUTATE)
	$(BIN)/mutmut results
	$(BIN)/python scripts/hand_mutations.py

# the committed world base and judge are what these write; rerunning continues from runs/world-pretrain
world-base: $(STAMP)
	$(BIN)/python -m palp_trainer.world.pretrain palp_trainer/world/assets/base --work runs/world-pretrain

judge: $(STAMP)
	$(BIN)/python -m palp_trainer.world.judge palp_trainer/world/assets/judge.safetensors

quality: $(STAMP)
	$(BIN)/python benchmarks/quality_bench.py judge
	$(BIN)/python benchmarks/quality_bench.py base
	$(BIN)/python benchmarks/quality_bench.py table2

clean:
	rm -rf $(VENV) runs
