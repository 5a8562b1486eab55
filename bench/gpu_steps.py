"""The Python steps of ``bench/gpu_check.sh`` (one subcommand each; the last line printed is
the step's result in the table). Exit 0 = PASS, 77 = SKIP (the reason printed), else FAIL.

    python bench/gpu_steps.py env
    python bench/gpu_steps.py jpegs DIR --n 2048 --width 500 --height 375
    python bench/gpu_steps.py parity --onnx M.onnx --fp16-onnx M16.onnx --pt2 M.pt2 --device cuda
    python bench/gpu_steps.py nvjpeg DIR --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SKIP = 77


def skip(reason: str) -> int:
    print(f"SKIP: {reason}", flush=True)
    return SKIP


def cmd_env(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    import torch

    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        print(smi)
    try:
        import onnxruntime as ort

        print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
        print(f"  available providers {ort.get_available_providers()}")
    except ImportError as exc:
        print(f"onnxruntime not importable: {exc}")
    import google.protobuf
    import grpc

    print(f"grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
    line = f"torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPUs"
    if not torch.cuda.is_available():
        if args.dry_run:
            print(f"{line}; no CUDA device (dry run)")
            return 0
        print(f"{line}; torch sees no CUDA device")
        return 1
    print(f"{line}; {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
    return 0


def _photo(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG (smooth colour fields + edges + noise: compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    chans = [
        np.sin(2 * np.pi * (rng.uniform(0.5, 4) * xx + rng.uniform(0.5, 4) * yy + rng.uniform()))
        for _ in range(3)
    ]
    arr = 128 + 90 * np.stack(chans, 2) + rng.normal(0, 10, (height, width, 3))
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    arr[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, 3)  # an object
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, seed, width, height = job
    path.write_bytes(_photo(seed, width, height))


def cmd_jpegs(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    jobs = [(out / "photos" / f"{i:05d}.jpg", i, args.width, args.height) for i in range(args.n)]
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photo, jobs, chunksize=16))
    size = sum(p.stat().st_size for p, *_ in jobs) / args.n / 1e3
    print(
        f"{args.n} JPEGs {args.width}x{args.height} (~{size:.0f} kB) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cos_abs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    return float(cos.min()), float(np.abs(a64 - b64).max() / max(1.0, np.abs(b64).max()))


def cmd_parity(args: argparse.Namespace) -> int:
    """Each runtime on the device vs the fp32 CPU reference (ONNX Runtime CPU): min cosine and
    max |diff| relative to the reference's scale, features at batch 16."""
    from simclr_embed.inference.runtime import OnnxRuntime, open_runtime

    ref_rt = OnnxRuntime(args.onnx, device="cpu", max_batch_size=16)
    s = ref_rt.info.image_size
    x = np.random.default_rng(0).integers(0, 256, (16, s, s, 3), dtype=np.uint8)
    ref = ref_rt.encode(x)["features"]
    summary: list[str] = []
    ok = True
    device = args.device
    candidates = [("torch fp32", args.pt2, "fp32"), ("torch bf16", args.pt2, "bf16")]
    candidates += [("ORT fp32", args.onnx, "auto"), ("ORT fp16", args.fp16_onnx, "auto")]
    for label, path, precision in candidates:
        if path is None:
            continue
        try:
            rt = open_runtime(path, device=device, max_batch_size=16, precision=precision)
        except Exception as exc:  # no CUDA provider here, ...
            print(f"{label}: not run ({str(exc).splitlines()[0][:100]})")
            summary.append(f"{label} not run")
            continue
        if device == "cuda" and not rt.on_gpu:
            print(f"{label}: not on the GPU (providers {rt.providers})")
            summary.append(f"{label} not on GPU")
            continue
        min_cos, rel = _cos_abs(rt.encode(x)["features"], ref)
        bound = 0.999 if ("bf16" in label or "fp16" in label) else 0.99999
        ok &= min_cos >= bound
        print(f"{label} on {rt.providers}: min_cos {min_cos:.6f} (>= {bound}), rel_abs {rel:.1e}")
        summary.append(f"{label} cos {min_cos:.5f}")
    print(f"vs fp32 CPU, {device}: " + "; ".join(summary))
    return 0 if ok else 1


def cmd_nvjpeg(args: argparse.Namespace) -> int:
    """Batched JPEG decode: torchvision.io.decode_jpeg on the device (nvJPEG) vs Pillow on all
    CPU cores, images/s over the same files."""
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    files = sorted(Path(args.dir).rglob("*.jpg"))[: args.n]
    if not files:
        return skip(f"no JPEGs under {args.dir}")
    blobs = [f.read_bytes() for f in files]
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def pil(b: bytes) -> int:
        with Image.open(io.BytesIO(b)) as im:
            return im.convert("RGB").size[0]

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(pil, blobs[:64]))
        t0 = time.perf_counter()
        list(pool.map(pil, blobs))
        cpu_rate = len(blobs) / (time.perf_counter() - t0)
    cpu_line = f"Pillow decode, {os.cpu_count()} threads: {cpu_rate:.0f} img/s"
    if args.device != "cuda" or not torch.cuda.is_available():
        # The CPU twin of the nvJPEG call, so its command line and API stay checked.
        out = decode_jpeg(datas[:4], device="cpu")
        assert len(out) == 4 and out[0].shape[0] == 3
        print(cpu_line)
        return skip(f"no CUDA device; {cpu_line}; torchvision decode_jpeg(list) ran on the CPU")
    decode_jpeg(datas[: args.batch], device="cuda")  # warm-up (nvJPEG handles, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(datas), args.batch):
        decode_jpeg(datas[i : i + args.batch], device="cuda")
    torch.cuda.synchronize()
    gpu_rate = len(datas) / (time.perf_counter() - t0)
    print(cpu_line)
    print(
        f"nvJPEG batched decode (batch {args.batch}): {gpu_rate:.0f} img/s = "
        f"{gpu_rate / cpu_rate:.1f}x Pillow on {os.cpu_count()} threads"
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU needed (CPU twins)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    j = sub.add_parser("jpegs")
    j.add_argument("dir")
    j.add_argument("--n", type=int, default=2048)
    j.add_argument("--width", type=int, default=500)
    j.add_argument("--height", type=int, default=375)
    q = sub.add_parser("parity")
    q.add_argument("--onnx", required=True)
    q.add_argument("--fp16-onnx", default=None)
    q.add_argument("--pt2", default=None)
    q.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    n = sub.add_parser("nvjpeg")
    n.add_argument("dir")
    n.add_argument("--n", type=int, default=1024)
    n.add_argument("--batch", type=int, default=128)
    n.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    args = p.parse_args()
    return {"env": cmd_env, "jpegs": cmd_jpegs, "parity": cmd_parity, "nvjpeg": cmd_nvjpeg}[
        args.cmd
    ](args)


if __name__ == "__main__":
    raise SystemExit(main())
