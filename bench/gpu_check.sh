#!/usr/bin/env bash
# GPU smoke check + short benchmarks, for a CUDA machine where the venv is already in place
# (`make venv` earlier, or the .venv carried over). Installs nothing and downloads nothing.
#
#   bash bench/gpu_check.sh            # or: make bench-gpu
#   PY=/opt/venv/bin/python bash bench/gpu_check.sh
#
# Each step is bounded by `timeout` and the whole script by BUDGET_S (480 s), and reports
# PASS / FAIL / SKIP; one failing step does not stop the others. Logs: $WORK/<step>.log.
# Exit code: 0 when no step failed.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-$ROOT/runs/gpu_check}
rm -rf "$WORK"
mkdir -p "$WORK"

NAMES=()
STATUS=()
SECONDS_TAKEN=()
NOTES=()

BUDGET_S=${BUDGET_S:-480}  # the whole script; each step gets min(its limit, what is left)

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $WORK/NAME.log, record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc left=$((BUDGET_S - SECONDS))
  if ((left < 15)); then
    set -- bash -c "skip 'out of time (BUDGET_S=$BUDGET_S)'"
  elif ((limit > left)); then
    limit=$left
  fi
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local status=PASS
  if ((rc == 124 || rc == 137)); then status="FAIL(timeout)"; elif ((rc == 77)); then status=SKIP; elif ((rc != 0)); then status="FAIL(rc=$rc)"; fi
  NAMES+=("$name")
  STATUS+=("$status")
  SECONDS_TAKEN+=($((SECONDS - t0)))
  # The note is the last non-empty line the step printed (its result, or its error).
  NOTES+=("$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | tr -d '\r' | cut -c1-110)")
  echo "   -> $status ($((SECONDS - t0)) s): ${NOTES[-1]}"
}

skip() { echo "$1"; exit 77; }
export -f skip

if [[ ! -x "$PY" ]]; then
  echo "no Python at $PY (run 'make venv' first or set PY=...)" >&2
  exit 1
fi
SIMCLR=("$PY" -m simclr_embed.cli)

# 1. The machine: driver, torch's CUDA, ONNX Runtime's providers.
step env 60 "$PY" - <<'EOF'
import shutil, subprocess, torch, onnxruntime as ort
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()}")
print(f"onnxruntime {ort.__version__} available providers {ort.get_available_providers()}")
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"OK {torch.cuda.get_device_name(0)}")
EOF

# 2. The real training CLI on CUDA (bf16 autocast) for a few steps on generated images.
step sample_data 60 "$PY" -m simclr_embed.sample_data "$WORK/data" --per-class 32 --size 64
step train_cuda 180 "${SIMCLR[@]}" train --data "$WORK/data" --out "$WORK/run" --arch resnet18 \
  --image-size 32 --stem standard --max-steps 20 --batch-size 128 --device cuda --workers 4 \
  --no-progress --log-every 10 --eval-data "$WORK/data" --eval-every 1000

# 3. Export fp32 (parity vs PyTorch) and fp16 (parity vs fp32).
# needs FILE STEP_NAME LIMIT CMD...: run the step only when an earlier step produced FILE.
needs() {
  local file=$1 name=$2
  if [[ -f "$file" ]]; then step "$name" "${@:3}"; else step "$name" 5 bash -c "skip 'no $file (an earlier step failed)'"; fi
}
CKPT=$WORK/run/checkpoints/last.pt
needs "$CKPT" export_fp32 180 "${SIMCLR[@]}" export-onnx --checkpoint "$CKPT" --output "$WORK/fp32.onnx"
needs "$CKPT" export_fp16 180 "${SIMCLR[@]}" export-onnx --checkpoint "$CKPT" --output "$WORK/fp16.onnx" --fp16

# 4. ONNX Runtime really runs on CUDA (get_providers, not get_available_providers) and agrees with CPU.
needs "$WORK/fp32.onnx" ort_cuda 120 "$PY" - "$WORK/fp32.onnx" <<'EOF'
import sys, numpy as np, onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels when the system has none
path = sys.argv[1]
gpu = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
print("providers in use:", gpu.get_providers())
assert gpu.get_providers()[0] == "CUDAExecutionProvider", "CUDA provider did not load"
x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
a, b = gpu.run(["features"], {"images": x})[0], cpu.run(["features"], {"images": x})[0]
cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
print(f"OK CUDA vs CPU features: max_abs={np.abs(a - b).max():.2e} min_cos={cos.min():.6f}")
assert cos.min() > 0.999
EOF

# 5. The server on CUDA end to end: start, health SERVING, embed a folder, SIGTERM → exit 0.
needs "$WORK/fp16.onnx" serve_cuda 150 "$PY" - "$WORK/fp16.onnx" "$WORK/data" "${SIMCLR[@]}" <<'EOF'
import signal, subprocess, sys, time
from pathlib import Path
from server.client import EmbeddingClient
from simclr_embed.demo_steps import free_port
model, data, simclr = sys.argv[1], sys.argv[2], sys.argv[3:]
port = free_port()
proc = subprocess.Popen([*simclr, "serve", "--model", model, "--port", str(port), "--device", "cuda"])
try:
    with EmbeddingClient(f"127.0.0.1:{port}") as client:
        for _ in range(450):  # up to 90 s for load + warm-up, unless the server exits first
            if proc.poll() is not None:
                sys.exit(f"server exited with {proc.returncode}")
            try:
                if client.health() == "SERVING":
                    break
            except Exception:
                pass
            time.sleep(0.2)
        else:
            sys.exit("server not SERVING after 90 s")
        info = client.model_info()
        print("server providers:", info["providers"])
        assert info["providers"][0] == "CUDAExecutionProvider", info["providers"]
        blobs = [p.read_bytes() for p in sorted(Path(data).rglob("*.png"))]
        client.embed(blobs[:64])
        t0 = time.perf_counter()
        vecs = client.embed(blobs * 4, concurrency=8)
        rate = len(vecs) / (time.perf_counter() - t0)
finally:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
print(f"OK served {len(vecs)} images ({vecs.shape[1]}-d) at {rate:.0f} img/s; server exit {rc}")
sys.exit(0 if rc == 0 else 1)
EOF

# 6. The stage benchmarks in their GPU configurations (each script owns its flags and output).
bench() {  # bench NAME LIMIT SCRIPT ARGS...: SKIP when the script is not there
  local name=$1 limit=$2 script=$3
  shift 3
  if [[ -f "$script" ]]; then step "$name" "$limit" "$PY" "$script" "$@"; else step "$name" 5 bash -c "skip 'no $script'"; fi
}
bench bench_train 200 bench/train_step.py --device cuda --arch resnet50 --image-size 224 \
  --precision bf16 --batch-size 128 --workers 14 --steps 10 --rounds 3
bench bench_serve 200 bench/serve.py --device cuda --seconds 8

echo
echo "GPU check on $(hostname) — $(date -u +%Y-%m-%dT%H:%M:%SZ) — logs in $WORK"
printf '%-13s %-14s %6s  %s\n' step status seconds note
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-13s %-14s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
  [[ ${STATUS[$i]} == FAIL* ]] && failed=1
done
exit $failed
