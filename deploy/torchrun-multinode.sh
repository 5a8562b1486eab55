#!/bin/bash
# Multi-node training without a scheduler: run this same command on every node.
#
#   # node 0 (its address: 10.0.0.1), node 1, ... — all with the same NNODES and RDZV_ENDPOINT:
#   NNODES=2 RDZV_ENDPOINT=10.0.0.1:29500 DATA=/data/train OUT=/shared/runs/r50 deploy/torchrun-multinode.sh
#
# torchrun's c10d rendezvous assigns node ranks itself; the first node to arrive hosts the
# store at RDZV_ENDPOINT (open that port between the nodes). NCCL picks the network; set
# NCCL_SOCKET_IFNAME (e.g. ib0, eth0) if it picks the wrong one. OUT must be on a filesystem every
# node sees for --resume after a restart (every rank then reads last.pt itself); rank 0 alone
# writes it.
set -euo pipefail

NNODES=${NNODES:?set NNODES to the number of machines}
RDZV_ENDPOINT=${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT of one of the machines}
DATA=${DATA:?set DATA to the image folder (same path on every node)}
OUT=${OUT:-runs/r50-multinode}
CONFIG=${CONFIG:-configs/imagenet-resnet50.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-4096}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}

WORLD=$((NNODES * GPUS_PER_NODE))
if ((GLOBAL_BATCH % WORLD != 0)); then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by $WORLD processes" >&2
  exit 1
fi
# torch 2.14's c10d rendezvous shares its TCPStore with the workers by default; measured on
# loopback (tests/training/test_multinode.py), a node that is lost and started again then never
# completes the next rendezvous (both agents wait 60 s for keys written to the other store).
# With the store not shared, the replacement node joins and the job resumes from last.pt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# --resume auto: the same command starts the run and continues it after any stop (a signal
# makes every rank checkpoint and exit 0; torchrun --max-restarts restarts crashed workers).
exec "$TORCHRUN" \
  --nnodes "$NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --max-restarts "${MAX_RESTARTS:-3}" \
  --rdzv-id "${RDZV_ID:-simclr}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" \
  -m simclr_embed.training \
  --config "$CONFIG" \
  --data "$DATA" \
  --out "$OUT" \
  --batch-size $((GLOBAL_BATCH / WORLD)) \
  --resume auto
