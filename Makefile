# The two commands of the README: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-sequential demo-lora test browser test-slurm bench bench-gpu leaderboard docs docs-site clean-venv

EXAMPLE_PLUGIN := examples/mergebench-example-plugin

$(BIN)/.installed: pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	@echo "installing mergebench and its dependencies (torch, open_clip, ...) into $(VENV): a few minutes the first time"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[test]"
	# the example external plugin (Model Breadcrumbs), so the tests show it beside the built-ins
	$(BIN)/pip install -q --no-deps -e $(EXAMPLE_PLUGIN)
	touch $@

## Run every registered method on mini8 (one single-threaded process per core, longest first; committed records are
## reused), write and print the leaderboard.
demo: $(BIN)/.installed
	$(BIN)/mergebench demo --suite mini8

## The sequential protocol on mini8: every sequential method plus Task Arithmetic and TIES through the adapter,
## 3 task orders each; writes the sequential table and curve next to the leaderboard.
demo-sequential: $(BIN)/.installed
	$(BIN)/mergebench demo --suite mini8 --protocol sequential --orders 3

## mini8 with LoRA experts: build the adapters once (on the cached mini8), then the baselines, every data-free and
## closed-form merge of the LoRA deltas, the test-time methods that run in a minute or two (TALL masks, Surgery,
## layer-wise AdaMerging) and CoPA-Merging (which merges the LoRA factors), two at a time; writes
## results/mini8-lora/LEADERBOARD.md. (Every method runs on LoRA experts, since they are also full weights:
## `mergebench demo --suite mini8-lora`; the rest take 10 to 60 minutes each.)
LORA_METHODS := pretrained individual weight_averaging task_arithmetic ties_merging dare model_breadcrumbs \
	tsv_merging iso_c iso_cts wudi_merging doge consensus_ta regmean lot_merging cat_merging tall_masks surgery \
	adamerging_layerwise copa_merging
demo-lora: $(BIN)/.installed
	$(BIN)/mergebench run --suite mini8-lora --jobs 2 $(LORA_METHODS)
	$(BIN)/mergebench leaderboard --suite mini8-lora --write

## Run the test suite (micro configuration; minutes on 2 cores).
test: $(BIN)/.installed browser
	$(BIN)/pytest -q

## Headless Chromium, in which a test sorts the HTML leaderboard: Debian's package, installed where this runs as root
## with apt-get; elsewhere that test is skipped and says so.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "headless Chromium is not installed (it needs root and apt-get): the HTML leaderboard's browser test is skipped"

## Sweeps on a real single-node Slurm cluster (root, Debian): installs slurmctld, slurmd and munge from Debian's
## packages if missing, starts the daemons by hand (no systemd), runs tests/integration/slurm, stops them by pid.
## At most 10 minutes, installation included.
test-slurm: $(BIN)/.installed
	timeout -k 60 600 bash tests/integration/slurm/run.sh

## pytest-benchmark measurements (speed, memory), run on demand; saved under .benchmarks/.
bench: $(BIN)/.installed
	$(BIN)/pytest -q tests/benchmarks --benchmark-only --benchmark-autosave

## Speed at real scale on the synthetic ViT-B/32 suite: on a GPU the eight test sets at full size (87,433 images,
## resident on the device, bf16, fused attention, eager and torch.compile) plus merge times and peak memory; without
## one a reduced CPU run that says so. At most 8 minutes; writes results/bench/gpu.json.
bench-gpu: $(BIN)/.installed
	$(BIN)/python -m mergebench.engine.gpu_bench --out results/bench/gpu.json --time-budget 420

## Rebuild a committed suite artifact from nothing (bench/suites/artifacts/SUITE: checkpoints, their sha256 and the
## accuracies measured at build; docs/mini8.md). One thread: the build is then the same computation on every machine
## size. mini8-lora-artifact trains its adapters on the committed mini8 artifact.
ARTIFACTS := mini8-artifact micro-artifact mini8-lora-artifact micro-lora-artifact
.PHONY: $(ARTIFACTS)
# one thread per process (the bytes the committed artifacts were built with), the experts in one process per core
BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
$(ARTIFACTS): %-artifact: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/mergebench build $* --artifact --jobs $(BUILD_JOBS)

leaderboard: $(BIN)/.installed
	$(BIN)/mergebench leaderboard --suite mini8 --write

## Regenerate the per-method reference pages (a test fails when they are out of date).
docs: $(BIN)/.installed
	$(BIN)/mergebench docs --out docs/methods

$(BIN)/.installed-docs: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

## Build the documentation site from docs/ into site/ (mkdocs.yml); --strict: a link to a missing page or heading
## fails the build. CI runs it after the tests.
docs-site: $(BIN)/.installed-docs
	$(BIN)/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
