"""Figures for benchmarks/gpu_check.sh: % of the GPU's bf16 peak, per-epoch times, the paper projection.

    python benchmarks/gpu_check_report.py peak                       # device, datasheet and measured bf16 peak (JSON)
    python benchmarks/gpu_check_report.py train-step PEAK.json STEP.json...   # images/s and % of peak per row
    python benchmarks/gpu_check_report.py batches BATCHES.json       # GPU-resident batches vs the CPU paths
    python benchmarks/gpu_check_report.py training RUN_DIR MLFLOW_DB --stacks N [--paper-stacks 450]

Each subcommand prints a markdown table (or JSON for ``peak``) and, as its last line, ``KEY: <figure>``:
the one figure gpu_check.sh puts in its summary table.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from pathlib import Path

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched in order
# against torch.cuda.get_device_name(). A GPU not listed gets only the measured matmul rate.
BF16_DENSE_PEAK_TFLOPS = [
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.0),  # fp32 accumulate
]


def datasheet_peak(name: str) -> float | None:
    for pattern, tflops in BF16_DENSE_PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def measure_bf16_matmul(n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of an n³ bf16 matmul on random data (3 warm-ups, mean of ``reps``)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def cmd_peak(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device")
    name = torch.cuda.get_device_name()
    report = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "datasheet_bf16_dense_tflops": datasheet_peak(name),
              "measured_bf16_matmul_tflops": round(measure_bf16_matmul(), 1)}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    sheet = report["datasheet_bf16_dense_tflops"]
    print(f"KEY: {name}; bf16 matmul {report['measured_bf16_matmul_tflops']} TFLOP/s measured"
          f"{f', {sheet:.0f} datasheet' if sheet else ''}")


def cmd_train_step(args: argparse.Namespace) -> None:
    peak = json.loads(args.peak.read_text()) if args.peak.exists() else {}
    sheet, measured = peak.get("datasheet_bf16_dense_tflops"), peak.get("measured_bf16_matmul_tflops")
    print(f"device: {peak.get('device', '?')}; bf16 dense peak: datasheet {sheet or '?'} TFLOP/s, "
          f"measured matmul {measured or '?'} TFLOP/s\n")
    print("| model | settings | images/s | train TFLOP/s | % datasheet bf16 peak | % measured bf16 matmul | peak memory MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    best = None
    for path in args.steps:
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        settings = ", ".join(s for s in (report.get("amp") if report.get("amp") != "none" else "fp32",
                                         "channels-last" if report.get("channels_last") else "") if s)
        for r in report["results"]:
            if "skipped" in r:
                print(f"| {r['model']} | {settings} | skipped: {r['skipped']} | | | | |")
                continue
            tflops = r["gflop_per_s"] / 1000
            pct_sheet = f"{100 * tflops / sheet:.1f}" if sheet else ""
            pct_meas = f"{100 * tflops / measured:.1f}" if measured else ""
            print(f"| {r['model']} | {settings} | {r['images_per_s']:.1f} | {tflops:.1f} | {pct_sheet} | {pct_meas} "
                  f"| {r['peak_mb']} |")
            if r["model"] == "ours" and (best is None or r["images_per_s"] > best[0]):
                best = (r["images_per_s"], settings, pct_sheet)
    if best is None:
        print("KEY: no result for ours")
        sys.exit(1)
    else:
        print(f"KEY: ours {best[0]:.0f} img/s ({best[1]})" + (f", {best[2]} % of bf16 peak" if best[2] else ""))


def cmd_batches(args: argparse.Namespace) -> None:
    results = json.loads(args.json.read_text())["results"]
    by_name = {r["method"]: r for r in results}
    gpu = next((r for r in results if r["method"].startswith("resident: GPU memory")), None)
    cpu = next((r for r in results if r["method"].startswith("resident: RAM")), None)
    if gpu is None:
        print("KEY: no GPU rows (CUDA not available to data_loading.py)")
        sys.exit(1)
    ratio = f", {gpu['samples_per_s'] / cpu['samples_per_s']:.1f}x resident on CPU" if cpu else ""
    print(f"KEY: GPU-resident {gpu['samples_per_s']:.0f} samples/s ({gpu['speedup_vs_baseline']:.1f}x TIFF baseline"
          f"{ratio}; {len(by_name)} methods)")


def epoch_times(db: Path) -> dict[int, float]:
    """Epoch -> seconds since the epoch (MLflow's timestamp of its val_loss) of the newest run in ``db``."""
    con = sqlite3.connect(db)
    try:
        run = con.execute("SELECT run_uuid FROM metrics WHERE key='val_loss' ORDER BY timestamp DESC LIMIT 1").fetchone()
        rows = con.execute("SELECT step, MIN(timestamp) FROM metrics WHERE key='val_loss' AND run_uuid=? GROUP BY step",
                           run).fetchall()
    finally:
        con.close()
    return {int(step): ts / 1000 for step, ts in rows}


def cmd_training(args: argparse.Namespace) -> None:
    history = json.loads((args.run_dir / "metrics.json").read_text())
    final = history[-1]
    times = epoch_times(args.db)
    phases = {h["epoch"]: h["phase"] for h in history}

    def per_epoch(phase: int) -> float | None:
        # intervals between consecutive epochs of the phase (the first epoch of a run pays the warm-up)
        steps = sorted(e for e in times if phases.get(e) == phase)
        gaps = [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
        return sum(gaps) / len(gaps) if gaps else None

    frozen, unfrozen = per_epoch(1), per_epoch(2)
    frozen = frozen or unfrozen
    print(f"wall time of the whole command: {args.wall:.0f} s" if args.wall else "")
    print("| epochs | s/epoch frozen | s/epoch unfrozen | accuracy | dice | iou | val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "?"  # noqa: E731
    print(f"| {len(history)} | {fmt(frozen)} | {fmt(unfrozen)} | {fmt(final.get('accuracy'))} | {fmt(final.get('dice'))} "
          f"| {fmt(final.get('iou'))} | {fmt(final.get('val_loss'))} |")
    if unfrozen is None:
        print("KEY: no per-epoch time (fewer than 2 consecutive epochs logged)")
        return
    scale = args.paper_stacks / args.stacks
    projected = scale * (5 * frozen + 100 * unfrozen)
    print(f"\nprojected `paper` profile (5 + 100 epochs, {args.paper_stacks} stacks, per-epoch times × "
          f"{args.paper_stacks}/{args.stacks}): {projected:.0f} s = {projected / 60:.1f} min, plus start-up")
    print(f"KEY: dice {fmt(final.get('dice'))}, acc {fmt(final.get('accuracy'))}; {unfrozen:.2f} s/epoch "
          f"({args.stacks} stacks); paper profile ≈ {projected / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("peak")
    p.add_argument("--out", type=Path)
    p = sub.add_parser("train-step")
    p.add_argument("peak", type=Path)
    p.add_argument("steps", type=Path, nargs="+")
    p = sub.add_parser("batches")
    p.add_argument("json", type=Path)
    p = sub.add_parser("training")
    p.add_argument("run_dir", type=Path)
    p.add_argument("db", type=Path)
    p.add_argument("--stacks", type=int, required=True, help="stacks in the store trained on")
    p.add_argument("--paper-stacks", type=int, default=450, help="stacks of the paper's trainer set (275 + 175)")
    p.add_argument("--wall", type=float, default=0.0, help="wall seconds of the training command")
    args = parser.parse_args(argv)
    {"peak": cmd_peak, "train-step": cmd_train_step, "batches": cmd_batches, "training": cmd_training}[args.cmd](args)


if __name__ == "__main__":
    main()
