# syntax=docker/dockerfile:1
# simclr-embed images. Two targets:
#
#   serve  the gRPC embedding server on CUDA + cuDNN with onnxruntime-gpu; no torch.
#            docker build --target serve -t simclr-embed:serve .
#            docker run --gpus all -p 50051:50051 -v "$PWD/runs/demo:/models:ro" \
#                simclr-embed:serve --model /models/model.onnx --host 0.0.0.0
#   train  torch with CUDA, for `simclr train` / `torchrun -m simclr_embed.training` and `simclr export-onnx`.
#            docker build --target train -t simclr-embed:train .
#            docker run --gpus all --ipc=host -v /data:/data:ro -v "$PWD/runs:/runs" \
#                simclr-embed:train torchrun --nproc-per-node 8 -m simclr_embed.training --data /data --out /runs/r50
#
# onnxruntime-gpu >= 1.2x and the current torch wheels are built against CUDA 13 + cuDNN 9
# (NVIDIA driver >= 580). For an older driver, build with a CUDA 12 base and matching pins:
#   --build-arg CUDA_RUNTIME=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#   --build-arg ORT_PIN='onnxruntime-gpu<1.24'

ARG CUDA_RUNTIME=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# python: the CUDA runtime image plus Python 3.12 in a virtual environment at /opt/venv.
FROM ${CUDA_RUNTIME} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------
# serve-build: install the server and client into the venv (build tools stay in this stage).
FROM python AS serve-build
ARG ORT_PIN=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY simclr_embed/ simclr_embed/
COPY proto/ proto/
# The serve extra pulls grpcio, onnxruntime-gpu, Pillow, numpy, prometheus-client: never torch.
# hadolint ignore=DL3013
RUN pip install ".[serve]" ${ORT_PIN:+"$ORT_PIN"} \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

# ---------------------------------------------------------------------------------------------
# serve: the runtime image. Mount the exported model at /models (read-only is fine).
FROM python AS serve
LABEL org.opencontainers.image.title="simclr-embed serve" \
      org.opencontainers.image.description="gRPC embedding server (ONNX Runtime CUDA, dynamic batching)"
COPY --from=serve-build /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin simclr
USER 10001:10001
WORKDIR /models
# 50051 gRPC (Embed, GetModelInfo, grpc.health.v1, reflection); 9090 Prometheus /metrics.
EXPOSE 50051 9090
# The health service answers NOT_SERVING until the model is loaded and warmed up; start-period
# covers that (cuDNN autotuning of the warm-up batch sizes can take tens of seconds).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["simclr", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["simclr", "serve"]
# 0.0.0.0: inside a container the published port reaches the server only on all interfaces
# (the CLI's own default stays 127.0.0.1).
CMD ["--model", "/models/model.onnx", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]

# ---------------------------------------------------------------------------------------------
# train: torch with its own CUDA libraries (pip wheels), so a slim CUDA base is enough.
FROM ${CUDA_BASE} AS train
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY simclr_embed/ simclr_embed/
COPY proto/ proto/
COPY configs/ configs/
# A different torch build (e.g. for another CUDA version) comes from PIP_EXTRA_INDEX_URL:
#   --build-arg PIP_EXTRA_INDEX_URL=<your torch wheel index>
ARG PIP_EXTRA_INDEX_URL=""
# hadolint ignore=DL3013
RUN pip install ".[all]" \
    && useradd --uid 10001 --user-group --create-home --shell /bin/bash simclr
USER 10001:10001
# /src holds configs/ (e.g. --config configs/imagenet-resnet50.yaml); write runs to a mounted volume.
WORKDIR /src
CMD ["simclr", "--help"]
