# simclr-embed — every target sets itself up; nothing needs installing by hand first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test lint proto bench venv clean demo docker bench-gpu bench-quality

venv: $(STAMP)

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[all,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	for f in deploy/slurm/train.sbatch deploy/torchrun-multinode.sh bench/gpu_check.sh; do bash -n $$f || exit 1; done

# The main job end to end on the bundled sample data (train → export → serve → embed → report).
# `make demo DATA=/path/to/images` runs it on your folder; DEMO_ARGS passes more flags
# (python -m simclr_embed.demo --help). Artifacts go to runs/demo (replaced on each run).
DATA ?=
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m simclr_embed.demo $(if $(DATA),--data "$(DATA)") $(DEMO_ARGS)

# Both images (needs a Docker engine with BuildKit; see README "Docker").
docker:
	@command -v docker >/dev/null || { echo "make docker: no 'docker' command on this machine" >&2; exit 1; }
	docker build --target serve -t simclr-embed:serve .
	docker build --target train -t simclr-embed:train .

# CPU benchmarks of each stage, side by side in one run each (minutes; results and the machine go in
# docs/benchmarks.md). The CIFAR-10 quality benchmark needs ../shared/data and ~30 min: bench-quality.
bench: $(STAMP)
	$(PY) bench/train_step.py
	$(PY) bench/export.py
	$(PY) bench/serve.py

bench-quality: $(STAMP)
	$(PY) bench/quality.py

# On a CUDA machine with the venv already in place: training step, ORT CUDA, serving, fp16 export.
bench-gpu: $(STAMP)
	bash bench/gpu_check.sh

# Regenerate the committed gRPC stubs from proto/ (tests check they are current).
proto: $(STAMP)
	$(PY) -m server.pb.generate

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
