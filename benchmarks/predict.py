"""Inference throughput of cellseg's U-Net against this machine's measured fp32 matmul limit (issue 15, item 2).

Tiles of ``--size``² pixels at ``--batch`` per forward through ``cellseg.inference.tiling.predict_tiled`` (the
code `cellseg predict` runs; no overlap, so one image of ``batch`` tiles is one batch) with a fresh random
resnet34 U-Net held channels-last as `cellseg predict` loads it; optionally (``--contiguous``) a plain forward of
the same batch with model and input in the default (contiguous) memory format, and (``--compile``) the same
tiled prediction through ``torch.compile(model)`` (inductor; its one-off compile time is reported apart).
The limit: a ``--matmul`` ² fp32 matrix product on the same device, same threads, in the same run.
FLOPs per tile forward are counted with torch's FlopCounterMode (2 per multiply-add).

    python benchmarks/predict.py [--device cpu|cuda] [--size 400] [--batch 4] [--reps 2] [--threads 0]
        [--contiguous] [--compile] [--quick] [--json-out FILE]

``--quick``: CI-sized (128² tiles, batch 2, 1 rep, 1024² matmul). Prints a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int, device: torch.device, reps: int = 3) -> float:
    """GFLOP/s of an n×n fp32 matrix product (1 warm-up, best of ``reps``)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 limit
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def timed(fn, device: torch.device, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2, help="timed batches per method (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the fp32 matmul that measures the limit")
    parser.add_argument("--contiguous", action="store_true", help="also time a plain contiguous-format forward")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) (inductor)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.reps, args.matmul = 128, 2, 1, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    from cellseg.inference.tiling import predict_tiled
    from cellseg.model import build_model

    limit = matmul_gflops(args.matmul, device)
    model = build_model("resnet34", in_channels=3, num_classes=2).eval()
    tile = torch.rand(1, 3, args.size, args.size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(tile)
    gflop_per_tile = counter.get_total_flops() / 1e9

    side = args.size * args.batch  # one row of `batch` tiles: exactly one batch, no overlap
    image = torch.rand(3, args.size, side)
    rows = []

    model_cl = model.to(device, memory_format=torch.channels_last)
    run_tiled = lambda: predict_tiled(model_cl, image, args.size, overlap=0.0, batch_size=args.batch, device=device)  # noqa: E731
    with torch.inference_mode():
        model_cl(tile.to(device, memory_format=torch.channels_last))  # warm-up: allocator, kernels
    rows.append(("predict_tiled, channels-last (as cellseg predict)", timed(run_tiled, device, args.reps)))
    if args.contiguous:
        model_c = model.to(memory_format=torch.contiguous_format)
        x = torch.rand(args.batch, 3, args.size, args.size, device=device)

        def forward():
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                model_c(x)

        forward()
        rows.append(("plain forward, contiguous", timed(forward, device, args.reps)))

    compile_s = None
    if args.compile:
        compiled = torch.compile(model_cl)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(torch.rand(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last))
        sync(device)
        compile_s = time.perf_counter() - start
        run_compiled = lambda: predict_tiled(compiled, image, args.size, overlap=0.0, batch_size=args.batch, device=device)  # noqa: E731
        rows.append(("predict_tiled, channels-last, torch.compile", timed(run_compiled, device, args.reps)))

    results = []
    for name, seconds in rows:
        s = statistics.median(seconds)
        tiles_per_s = args.batch / s
        results.append({"method": name, "batch_s": seconds, "tiles_per_s": tiles_per_s,
                        "megapixels_per_s": tiles_per_s * args.size**2 / 1e6,
                        "gflop_per_s": tiles_per_s * gflop_per_tile,
                        "percent_of_matmul": 100 * tiles_per_s * gflop_per_tile / limit})
    report = {
        "benchmark": "predict", "device": str(device), "size": args.size, "batch": args.batch, "reps": args.reps,
        "gflop_per_tile_forward": gflop_per_tile, "fp32_matmul_gflops": limit, "matmul_side": args.matmul,
        "compile_s": compile_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "loadavg": os.getloadavg()},
        "results": results,
    }
    print(f"\nInference, {args.size}² tiles, batch {args.batch}, {device} ({torch.get_num_threads()} threads); "
          f"{gflop_per_tile:.0f} GFLOP per tile forward; fp32 matmul {args.matmul}²: {limit:.0f} GFLOP/s\n")
    print("| method | s/batch (median) | tiles/s | MP/s | GFLOP/s | % of fp32 matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {statistics.median(r['batch_s']):.2f} | {r['tiles_per_s']:.2f} "
              f"| {r['megapixels_per_s']:.2f} | {r['gflop_per_s']:.0f} | {r['percent_of_matmul']:.0f} |")
    if compile_s is not None:
        print(f"\ntorch.compile: {compile_s:.0f} s to compile (first batch), before the timed batches")
    text = json.dumps(report, indent=2)
    print("\n" + text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
