PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: run test lint format bench demo-model rlhf-demo clean

.venv/.installed: pyproject.toml scripts/install_torch.sh scripts/install_system.sh
	scripts/install_system.sh
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: .venv/.installed
	.venv/bin/qwenkit chat

lint: .venv/.installed
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

format: .venv/.installed
	.venv/bin/ruff check --fix src tests benchmarks
	.venv/bin/ruff format src tests benchmarks

test: lint
	$(PY) -m pytest

demo-model: .venv/.installed
	.venv/bin/qwenkit demo build

# reward model + PPO and DPO of the demo model into runs/rlhf-demo (docs/rlhf.md); stage overrides as
# RLHF_ARGS="--ppo.train.max_steps 20 --prompts 200"
rlhf-demo: .venv/.installed
	$(PY) scripts/rlhf_demo.py --out runs/rlhf-demo $(RLHF_ARGS)

bench: .venv/.installed
	$(PY) benchmarks/inference.py

clean:
	rm -rf .venv build src/*.egg-info
