#!/usr/bin/env bash
# GPU check: every CUDA path once and the stage benchmarks, in one bounded run, one table.
#
# Runs with whatever python3 has torch (the lent GPU machine's own: torch, torchvision, onnx,
# Pillow, ... but no project venv and no network). Missing or too old packages travel as wheels:
#
#   make gpu-wheels        # here: .whl/ (grpcio, protobuf, health, reflection, kornia) and
#                          # .whl-ort/ (onnxruntime-gpu split into parts + MANIFEST)
#
# Then, on the device tool (each call carries at most 64 MiB; files outside $OUT survive while
# the machine stays warm, 30 s after a call):
#
#   1..N  carry [".whl-ort/part-0K", ".whl-ort/MANIFEST"]:
#             bash bench/gpu_check.sh --stash-ort-part .whl-ort/part-0K      (K = 0..N-1, in a row)
#   last  carry [".whl"]:  bash bench/gpu_check.sh                  (timeout_s 600)
#
# The last call installs .whl/*.whl with `pip --no-index --no-deps --target`, reassembles and
# installs onnxruntime-gpu when every part is there (checksums in MANIFEST; else its steps SKIP
# with the reason), runs the project from this tree (PYTHONPATH, no install) and writes
# $OUT/gpu_check.md (the table) and $OUT/gpu_check-logs.tgz.
#
#   bash bench/gpu_check.sh --dry-run   # anywhere, no GPU: tiny sizes, CPU twins, < 1 min;
#                                       # tests/test_gpu_check.py runs it so no command rots
#
# Each step is bounded by `timeout` and the whole run by BUDGET_S (480 s; dry run 150 s), and
# reports PASS / FAIL / SKIP (exit 77 = SKIP, with the reason as its last line); one failing
# step does not stop the others. Exit code: 0 when no step failed.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

ORT_PARTS=/tmp/simclr-ort-parts
if [[ ${1:-} == --stash-ort-part ]]; then  # one call of the carry sequence above
  part=${2:?usage: --stash-ort-part .whl-ort/part-0K}
  mkdir -p "$ORT_PARTS"
  cp "$part" "$ORT_PARTS/" && cp "$(dirname "$part")/MANIFEST" "$ORT_PARTS/MANIFEST" || exit 1
  echo "stashed $(basename "$part") ($(du -h "$part" | cut -f1)); have: $(ls "$ORT_PARTS" | tr '\n' ' ')"
  exit 0
fi

DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
if ((DRY)); then
  PY=${PY:-$( [[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3 )}
  DEV=cpu
  BUDGET_S=${BUDGET_S:-150}
else
  PY=${PY:-python3}
  DEV=cuda
  BUDGET_S=${BUDGET_S:-480}
fi
WORK=${WORK:-/tmp/simclr-gpu-check}
OUT_DIR=${OUT:-$WORK/out}
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT_DIR"

# -- packages: carried wheels, then onnxruntime-gpu from its parts -----------------------------
SITE=$WORK/site
EXTRA_PATH=
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >"$WORK/wheels.log" 2>&1 && EXTRA_PATH=$SITE
  echo "wheels: $(ls .whl | tr '\n' ' ')-> ${EXTRA_PATH:-install FAILED, see wheels.log}"
fi
ORT_NOTE="no onnxruntime-gpu parts stashed (see the header: --stash-ort-part)"
if [[ -f $ORT_PARTS/MANIFEST ]]; then
  name=$(sed -n 's/^wheel //p' "$ORT_PARTS/MANIFEST")
  want=$(sed -n 's/^sha256 //p' "$ORT_PARTS/MANIFEST")
  cat "$ORT_PARTS"/part-* >"$WORK/$name" 2>/dev/null
  got=$(sha256sum "$WORK/$name" | cut -d' ' -f1)
  if [[ $got != "$want" ]]; then
    ORT_NOTE="onnxruntime-gpu parts incomplete ($(ls "$ORT_PARTS" | grep -c part-) stashed; checksum differs)"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
      "$WORK/ort" "$WORK/$name" >"$WORK/ort-install.log" 2>&1; then
    ORT_NOTE="onnxruntime-gpu installed from $(ls "$ORT_PARTS" | grep -c part-) parts"
    EXTRA_PATH=$WORK/ort${EXTRA_PATH:+:$EXTRA_PATH}
  else
    ORT_NOTE="onnxruntime-gpu install failed (ort-install.log)"
  fi
fi
export PYTHONPATH=${EXTRA_PATH:+$EXTRA_PATH:}$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
echo "python $PY, PYTHONPATH=$PYTHONPATH; $ORT_NOTE"

NAMES=()
STATUS=()
SECONDS_TAKEN=()
NOTES=()

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $WORK/NAME.log, record the outcome.
# NOTE_RE (environment, optional): the result is the last log line matching it (default: the
# last non-empty line).
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc left=$((BUDGET_S - SECONDS))
  if ((left < 15)); then
    set -- bash -c "echo 'SKIP: out of time (BUDGET_S=$BUDGET_S)'; exit 77"
  elif ((limit > left)); then
    limit=$left
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local status=PASS
  if ((rc == 124 || rc == 137)); then status="FAIL(timeout)"; elif ((rc == 77)); then status=SKIP; elif ((rc != 0)); then status="FAIL(rc=$rc)"; fi
  local note
  note=$(grep -E "${NOTE_RE:-.}" "$WORK/$name.log" | grep -v '^\s*$' | tail -n 1 | tr -d '\r|' | cut -c1-220)
  NAMES+=("$name")
  STATUS+=("$status")
  SECONDS_TAKEN+=($((SECONDS - t0)))
  NOTES+=("$note")
  echo "   -> $status ($((SECONDS - t0)) s): $note"
}
skip_step() {  # skip_step NAME REASON
  step "$1" 5 bash -c "echo 'SKIP: $2'; exit 77"
}
# needs FILE NAME LIMIT CMD...: the step only when an earlier step produced FILE.
needs() {
  local file=$1 name=$2
  if [[ -e $file ]]; then step "$name" "${@:3}"; else skip_step "$name" "no $(basename "$file") (an earlier step failed)"; fi
}

SIMCLR=("$PY" -m simclr_embed.cli)
if ((DRY)); then
  N_JPEG=48 JPEG_W=160 JPEG_H=120
  R50=(--arch resnet18 --image-size 32 --stem standard --batch-size 8 --max-steps 2 --workers 1)
  SMOKE_STEPS=3 SMOKE_BATCH=16
  SYNTH=(--device cpu --arch resnet18 --image-size 32 --batch-size 8 --steps 1 --rounds 1
    --warmup 0 --workers 1 --data-images 16 --data-batches 1)
  # The smoke run's exported program stands in for the freshly built ResNet-50.
  SERVE=(--device cpu --model "$WORK/model.pt2" --clients 1 --seconds 0.3 --rounds 1
    --warmup-s 0.1 --photos 8)
  VERIFY=(--no-verify)  # the parity checks have their own tests; here only the command lines
  GRADCACHE=(--device cpu --arch resnet18 --image-size 32 --batch-size 32 --chunk-size 8 --steps 1)
else
  N_JPEG=2048 JPEG_W=500 JPEG_H=375  # ImageNet-like sizes
  R50=(--arch resnet50 --image-size 224 --batch-size 256 --max-steps 40 --workers 14
    --precision bf16)
  SMOKE_STEPS=20 SMOKE_BATCH=128
  SYNTH=(--device cuda --arch resnet50 --image-size 224 --precision bf16 --batch-size 256
    --steps 5 --rounds 3 --workers 14 --data-batches 10)
  SERVE=(--device cuda --arch resnet50 --image-size 224 --clients 1 64 --seconds 5 --rounds 1
    --max-batch-size 64)
  VERIFY=()
  GRADCACHE=(--device cuda --precision bf16 --arch resnet50 --image-size 224 --batch-size 4096
    --chunk-size 256 --steps 2 --largest)
fi
DRYFLAG=$( ((DRY)) && echo --dry-run)

# 1. The machine: GPU, torch's CUDA, ONNX Runtime's providers, grpc/protobuf.
step env 60 "$PY" bench/gpu_steps.py $DRYFLAG env

# 2. Inputs: the bundled sample set (small, for the smoke run) and photo-sized JPEGs.
step sample_data 60 "$PY" -m simclr_embed.demo.sample_data "$WORK/data" --per-class 32 --size 64
step jpegs 60 "$PY" bench/gpu_steps.py jpegs "$WORK/jpegs" --n $N_JPEG --width $JPEG_W --height $JPEG_H

# 3. Training: the real CLI (bf16 autocast on CUDA) for a checkpoint to export, then ResNet-50 at
#    224 px under torchrun from real JPEG files (images/s and data wait as the trainer logs them),
#    then the same
#    step on device tensors (bench/train_step.py: no input pipeline at all).
step train_smoke 180 "${SIMCLR[@]}" train --data "$WORK/data" --out "$WORK/run" --arch resnet18 \
  --image-size 32 --stem standard --max-steps $SMOKE_STEPS --batch-size $SMOKE_BATCH --device $DEV \
  --workers 2 --no-progress --log-every 10 --eval-data "$WORK/data" --eval-every 1000
#    Twice: the appearance stage in the DataLoader workers, and on the GPU (--augment-on device:
#    workers only decode and crop); the log line gives images/s and the data-wait share.
for where in workers device; do
  NOTE_RE='img/s' needs "$WORK/jpegs/photos" "train_jpeg_$where" 240 "$PY" -m torch.distributed.run \
    --standalone --nproc-per-node 1 -m simclr_embed.training --data "$WORK/jpegs" --out "$WORK/r50-$where" \
    "${R50[@]}" --augment-on "$where" --device $DEV --no-progress --log-every 10
done
NOTE_RE='^\| SimCLR' step train_synth 200 "$PY" bench/train_step.py "${SYNTH[@]}"
#    Gradient caching: the largest ResNet-50 batch that fits unchunked vs batch 4096 chunked.
NOTE_RE='^\| (largest|chunk|whole)' step gradcache 240 "$PY" bench/gradcache.py "${GRADCACHE[@]}"

# 4. Export fp32 (+ the torch program) and fp16, each verified against PyTorch.
CKPT=$WORK/run/checkpoints/last.pt
needs "$CKPT" export_fp32 180 "${SIMCLR[@]}" export-onnx --checkpoint "$CKPT" \
  --output "$WORK/fp32.onnx" --torch-program "$WORK/model.pt2" "${VERIFY[@]}"
needs "$CKPT" export_fp16 180 "${SIMCLR[@]}" export-onnx --checkpoint "$CKPT" \
  --output "$WORK/fp16.onnx" --fp16 "${VERIFY[@]}"

# 5. Every runtime on the device against fp32 on the CPU: torch fp32/bf16, ORT CUDA fp32/fp16.
needs "$WORK/model.pt2" parity 120 "$PY" bench/gpu_steps.py parity --onnx "$WORK/fp32.onnx" \
  --fp16-onnx "$WORK/fp16.onnx" --pt2 "$WORK/model.pt2" --device $DEV

# 6. The server on the device end to end with the torch runtime: SERVING, embed, SIGTERM → 0.
needs "$WORK/model.pt2" serve_torch 150 "$PY" - "$WORK/model.pt2" "$WORK/data" $DEV "${SIMCLR[@]}" <<'EOF'
import signal, subprocess, sys, time
from pathlib import Path
import numpy as np
from simclr_embed.client import EmbeddingClient
from simclr_embed.demo.steps import free_port
model, data, device, simclr = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
port, mport = free_port(), free_port()
proc = subprocess.Popen([*simclr, "serve", "--model", model, "--port", str(port), "--device",
                         device, "--drain-delay-s", "0", "--metrics-port", str(mport)])
try:
    with EmbeddingClient(f"127.0.0.1:{port}", timeout=120) as client:
        client.wait_until_serving(timeout=120)
        info = client.model_info()
        print("server providers:", info["providers"])
        assert info["providers"][0].startswith(f"torch-{device}"), info["providers"]
        blobs = [p.read_bytes() for p in sorted(Path(data).rglob("*.png"))]
        client.embed(blobs[:64])
        t0 = time.perf_counter()
        vecs = client.embed(blobs * 4, concurrency=8)
        rate = len(vecs) / (time.perf_counter() - t0)
        assert np.isfinite(vecs).all()
        import urllib.request  # the NVML gauges (gpu-metrics extra) on the real /metrics
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        gpu = [ln for ln in text.splitlines() if ln.startswith(("simclr_gpu_utilization", "simclr_gpu_memory_used"))]
finally:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
gpu_note = "; ".join(gpu) if gpu else "no GPU metrics (CPU, or nvidia-ml-py missing)"
print(f"served {len(vecs)} PNGs ({vecs.shape[1]}-d) on {info['providers'][0]} at {rate:.0f} img/s; exit {rc}; {gpu_note}")
sys.exit(0 if rc == 0 else 1)
EOF

# 7. Serving benchmarks (bench/serve.py: P1 in-process loop, P2 naive server, P3 latency), torch
#    runtime; ONNX Runtime's CUDA provider when onnxruntime-gpu is here.
NOTE_RE='^P[123]' step bench_serve_torch 200 "$PY" bench/serve.py --runtime torch "${SERVE[@]}" \
  --cache "$WORK/bench-serve"
if ((DRY)); then
  skip_step bench_serve_ort "dry run: the same bench/serve.py as bench_serve_torch, --runtime onnx"
elif "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  NOTE_RE='^P[123]' step bench_serve_ort 200 "$PY" bench/serve.py --runtime onnx "${SERVE[@]}" \
    --cache "$WORK/bench-serve"
else
  skip_step bench_serve_ort "$ORT_NOTE"
fi

# 8. Batched JPEG decode on the GPU (nvJPEG via torchvision) vs Pillow on every core.
needs "$WORK/jpegs/photos" nvjpeg 120 "$PY" bench/gpu_steps.py nvjpeg "$WORK/jpegs" --device $DEV

# -- the table ------------------------------------------------------------------------------
GPU=$(grep -m1 -E '^GPU 0|; [A-Z].*bf16' "$WORK/env.log" 2>/dev/null | cut -c1-120)
{
  echo "# GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)$( ((DRY)) && echo ' (DRY RUN: CPU twins, tiny sizes)')"
  echo
  echo "${GPU:-no GPU}; python: $PY; $ORT_NOTE; budget ${BUDGET_S}s, used ${SECONDS}s"
  echo
  echo "| step | status | s | result |"
  echo "|---|---|---:|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} | ${NOTES[$i]} |"
  done
} >"$OUT_DIR/gpu_check.md"
tar czf "$OUT_DIR/gpu_check-logs.tgz" -C "$WORK" $(cd "$WORK" && ls *.log) 2>/dev/null
echo
cat "$OUT_DIR/gpu_check.md"
failed=0
for s in "${STATUS[@]}"; do [[ $s == FAIL* ]] && failed=1; done
exit $failed
