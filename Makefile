# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python
	$(BIN)/pip install -e '.[test]'

demo: install
	$(BIN)/retino synth $(DEMO)/data --n 400 --size 128 --seed 0 --force
	$(BIN)/retino stats $(DEMO)/data --plot reports/demo-balance.png --force
	$(BIN)/retino train --data $(DEMO)/data --img-size 64 --epochs 8 --batch-size 32 --project $(DEMO)/runs --name train --force
	$(BIN)/retino evaluate $(DEMO)/runs/train --split test --force
	$(BIN)/retino report $(DEMO)/runs/train --out reports/demo --force
	$(BIN)/retino export $(DEMO)/runs/train --force
	$(BIN)/retino predict $(DEMO)/data/test --model $(DEMO)/runs/train/model.onnx --out $(DEMO)/predictions.csv --force
	$(BIN)/retino explain $(DEMO)/runs/train $(DEMO)/data/test --out reports/demo/explain --layer layer3 --force

# One pytest-xdist worker per core; conftest gives each worker one intra-op thread, so two
# workers on two cores do not fight over them: 11.5 min in one process, 6 min on CI's 2 cores.
test: install-test
	$(BIN)/python -m pytest -n auto

clean:
	rm -rf $(VENV) $(DEMO) runs
