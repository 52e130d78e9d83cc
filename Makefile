# mmemb-lab: one entry point for the CPU workbench.
#   make demo   SEED=0 OUT=runs/demo   the tiny recipe: toy world -> stage-0 foundation -> selection -> stage 1 -> stage 2 -> eval
#   make test                          ruff, then every test, notebooks included, under the tiny preset
#   make browser-test                  the notebooks in JupyterLab in headless Chromium (figures drawn offline)
#   make figures RUN=runs/demo         the method's figures from a finished demo run, for print (figures/<run>/)
# The venv is built from requirements-cpu.txt, which pins torch==2.13.0 (CPU) next to everything that
# depends on it, so pip never resolves a CUDA build. Never add torchvision to this venv.

PY   ?= python3
VENV ?= .venv
SEED ?= 0
OUT  ?= runs/demo

VPY    := $(VENV)/bin/python
MARKER := $(VENV)/.installed
# Tests and the demo must never wait on the Hugging Face Hub (a stray lookup retries for ~50 s).
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: venv demo test browser-test figures bench gpu-check foundation lab clean

venv: $(MARKER)

# Reinstalls whenever the pins or the package metadata change.
$(MARKER): requirements-cpu.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --no-compile -r requirements-cpu.txt
	@# byte-compile on every core (pip compiles one file at a time: 64 s -> 30 + 19 s measured here); like
	@# pip's own pass, it skips files written for other Python versions (torch ships a 3.12-only one)
	$(VPY) -m compileall -q -j 0 "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	$(VPY) -m pip install --no-deps -e .
	touch $@

demo: $(MARKER)
	$(OFFLINE) $(VPY) -m mmemb_lab run configs/recipes/tiny.yaml --seed $(SEED) --out $(OUT)

test: $(MARKER)
	$(VPY) -m ruff check mmemb_lab tests notebooks
	$(OFFLINE) $(VPY) -m pytest tests

# Only the browser test: JupyterLab in headless Chromium (Debian's `chromium`), figures must draw offline;
# screenshots under runs/browser/. Skips without chromium unless MMEMB_REQUIRE_BROWSER=1.
browser-test: $(MARKER)
	$(OFFLINE) $(VPY) -m pytest tests/test_browser.py

# The method's figures from a finished demo run, for print: figures/<run name>/*.html, *.png (3x) and *.pdf.
RUN ?= runs/demo
figures: $(MARKER)
	$(OFFLINE) $(VPY) -m mmemb_lab figures $(RUN)

bench: $(MARKER)
	$(OFFLINE) $(VPY) -m mmemb_lab bench --out runs/bench

# On one GPU: stage-1 speed, memory and MFU of Qwen3-VL-4B (released shape, random weights: no download) at the
# paper recipe's per-GPU batch with GradCache, direct-mode embedding throughput, gate latency closed and open.
# Writes runs/gpu-check/gpu_check.json. On a CPU: make gpu-check GPU_CHECK_ARGS="--scale tiny".
gpu-check: $(MARKER)
	$(OFFLINE) $(VPY) -m mmemb_lab gpu-check --out runs/gpu-check $(GPU_CHECK_ARGS)

# Trains the stage-0 foundation model into data/foundation from scratch, as one run (resumable from
# data/foundation.work, whose manifest refuses a rerun with other settings): 11600 steps, the last 3000 also
# writing gold chains of thought in the reasoning span (~3.5 h on 2 cores). Two 1-thread processes (gloo) use
# 2 cores better than one 2-thread process; the same code runs on N GPUs under torchrun/accelerate. The
# committed checkpoint was made in segments, not by this one run: data/README.md.
foundation: $(MARKER)
	$(OFFLINE) OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 -m mmemb_lab foundation --out data/foundation \
		--steps 11600 --reason-batch 32 --reason-phase 8600

lab: $(MARKER)
	$(VENV)/bin/jupyter lab notebooks/

# Generated outputs only; data/ holds committed files and is never removed here.
clean:
	rm -rf runs/ worlds/
