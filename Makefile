# simclr-embed — every target sets itself up; nothing needs installing by hand first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test lint proto bench venv clean demo docker bench-gpu bench-quality gpu-wheels

venv: $(STAMP)

# CPU=1: ONNX Runtime's CPU build instead of onnxruntime-gpu (extra all-cpu; `make clean` first when
# switching an existing venv). TORCH_INDEX=URL: torch/torchvision from that index first — PyTorch's
# CPU wheel index gives a torch without the ~3 GB of CUDA libraries that PyPI's build carries.
CPU ?=
TORCH_INDEX ?=
EXTRAS := $(if $(CPU),all-cpu,all)

# Reinstall only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) install --quiet 'torch<2.15' 'torchvision<0.30' --index-url '$(TORCH_INDEX)')
	$(PIP) install --quiet -e '.[$(EXTRAS),dev]'
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

# On a CUDA machine: every CUDA path once + the stage benchmarks, one table (bench/gpu_check.sh
# header: how to run it on a lent GPU machine with no venv and no network).
bench-gpu:
	bash bench/gpu_check.sh

# The wheels a lent GPU machine (Python 3.12, torch, CPU-only onnxruntime, no network) lacks,
# for bench/gpu_check.sh: .whl/ travels whole; onnxruntime-gpu (~256 MB) is split into
# .whl-ort/part-* of at most ORT_PART_MB, one part per call (64 MiB per call), plus a MANIFEST.
GPU_WHEELS ?= grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 \
	grpcio-reflection==1.85.1 kornia==0.9.0 kornia_rs==0.2.0
ORT_GPU ?= onnxruntime-gpu==1.31.1
ORT_PART_MB ?= 55
CP312 := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	rm -rf .whl .whl-ort && mkdir -p .whl .whl-ort/full
	$(PIP) download -q $(CP312) -d .whl $(GPU_WHEELS)
	$(PIP) download -q $(CP312) -d .whl-ort/full $(ORT_GPU)
	cd .whl-ort && split -b $(ORT_PART_MB)M -d full/*.whl part- \
		&& { echo "wheel $$(basename full/*.whl)"; echo "sha256 $$(sha256sum full/*.whl | cut -d' ' -f1)"; } > MANIFEST \
		&& rm -rf full
	@du -sh .whl .whl-ort/part-*; cat .whl-ort/MANIFEST

# Regenerate the committed gRPC stubs from proto/ (tests check they are current).
proto: $(STAMP)
	$(PY) -m simclr_embed.pb.generate

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
