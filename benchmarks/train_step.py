"""Images/s of one training step of cellseg's U-Net against its peers, side by side in one run (issue 3, item 6).

A step is forward, cross-entropy loss, backward and an AdamW step (weight decay 1e-2) on a random
batch (default 4 x 3 x 400 x 400, 2 classes), for:
  ours     cellseg.model.build_model("resnet34")          (the paper's pixel-shuffle U-Net)
  fastai   fastai's create_unet_model(resnet34, n_out=2)   (DynamicUnet, what the paper trained)
  smp      segmentation_models_pytorch Unet("resnet34")    (a lighter, different decoder)
Peers are optional imports: a model whose package is missing is skipped with a note (install them in
a scratch environment to get the whole table; neither is a cellseg dependency). A peer that refuses
--size gets the next multiple of 32 (noted in the table).

Every (model, device, setting) runs in its own child process, one after another, so that each
reports its own peak memory (CPU: peak RSS from ``resource``; CUDA: ``max_memory_allocated``).
Settings on the CPU (``--malloc``):
  default  glibc's malloc as it is: large activation buffers go back to the OS after every step and
           are page-faulted back in on the next one
  tuned    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 set for the child (keeps freed
           memory in the heap: faster, more resident memory)
``--rounds`` repeats the whole sequence (rotating the model order) so that a busy machine slows all
models alike; the table gives medians over all timed steps. On a machine shared with other work,
compare the CPU s/step column (process CPU time) rather than wall time. Prints a markdown table and JSON
(``--json-out`` also writes it).

    python benchmarks/train_step.py [--batch 4] [--size 400] [--warmup 1] [--reps 3]
        [--device auto|cpu|cuda|cpu,cuda] [--malloc default|tuned|both] [--optimizer loop|foreach|fused]
        [--amp none|bf16] [--channels-last]

``--amp bf16`` runs forward and loss under bf16 autocast (what ``cellseg train`` does on CUDA);
``--channels-last`` converts model and batch to channels-last (likewise). Both show in the note column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODELS = ("ours", "fastai", "smp")
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def build(name: str, size: int):
    """(model, note) for ``name``; raises ImportError when the peer's package is not installed."""
    if name == "ours":
        from cellseg.model import build_model

        return build_model("resnet34", in_channels=3, num_classes=2), ""
    if name == "fastai":
        from fastai.vision.learner import create_unet_model
        from torchvision.models import resnet34

        return create_unet_model(resnet34, n_out=2, img_size=(size, size), pretrained=False), ""
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=3, classes=2), ""


def child(args: argparse.Namespace) -> dict:
    """Time ``args.reps`` steps of one model on one device after ``args.warmup`` untimed ones."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = {"model": args.child, "device": args.device, "malloc": args.malloc_label, "optimizer": args.optimizer,
           "amp": args.amp, "channels_last": args.channels_last}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    try:
        model, note = build(args.child, args.size)
    except ImportError as exc:
        return {**row, "skipped": f"not installed ({exc.name})"}
    model = model.to(device, memory_format=memory_format)
    opt_kw = {"fused": True} if args.optimizer == "fused" else {"foreach": args.optimizer == "foreach"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, **opt_kw)
    size = args.size

    def batch(side):
        g = torch.Generator().manual_seed(1)
        x = torch.rand(args.batch, 3, side, side, generator=g).to(device, memory_format=memory_format)
        y = torch.randint(0, 2, (args.batch, side, side), generator=g).to(device)
        return x, y

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            out = model(x).as_subclass(torch.Tensor)  # fastai returns its TensorBase subclass
            loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    x, y = batch(size)
    try:
        with FlopCounterMode(display=False) as flops:  # first warm-up step also counts the FLOPs
            out = step(x, y)
    except (RuntimeError, ValueError) as exc:  # a peer that wants multiples of 32
        size = -(-size // 32) * 32
        note = f"{args.size} refused ({str(exc).splitlines()[0][:60]}...): ran {size}"
        x, y = batch(size)
        with FlopCounterMode(display=False) as flops:
            out = step(x, y)
    settings = ", ".join(s for s in ("bf16 autocast" if args.amp == "bf16" else "",
                                     "channels-last" if args.channels_last else "") if s)
    if settings:
        note = f"{settings}; {note}" if note else settings
    if tuple(out.shape[-2:]) != (size, size):
        note = (note + "; " if note else "") + f"output {tuple(out.shape[-2:])}"
    for _ in range(args.warmup - 1):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **row,
        "size": size,
        "note": note,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_gflop_per_image": flops.get_total_flops() / args.batch / 1e9,
        "step_s": wall,
        "cpu_s": cpu,
        "peak_mb": round(peak_mb),
        "threads": torch.get_num_threads(),
    }


def run_child(args: argparse.Namespace, model: str, device: str, malloc: str) -> dict:
    env = dict(os.environ)
    for key in TUNED_MALLOC:
        env.pop(key, None)
    if malloc == "tuned":
        env.update(TUNED_MALLOC)
    cmd = [sys.executable, __file__, "--child", model, "--device", device, "--malloc-label", malloc,
           "--batch", str(args.batch), "--size", str(args.size), "--warmup", str(args.warmup),
           "--reps", str(args.reps), "--optimizer", args.optimizer, "--threads", str(args.threads),
           "--amp", args.amp] + (["--channels-last"] if args.channels_last else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": model, "device": device, "malloc": malloc, "skipped": f"failed: {tail[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge(rows: list[dict]) -> dict:
    """One result from the same (model, device, malloc) over several rounds."""
    first = dict(rows[0])
    if "skipped" in first:
        return first
    first["step_s"] = [t for r in rows for t in r["step_s"]]
    first["cpu_s"] = [t for r in rows for t in r["cpu_s"]]
    first["peak_mb"] = max(r["peak_mb"] for r in rows)
    return first


def table(results: list[dict], batch: int) -> str:
    for r in results:
        if "skipped" not in r:
            r["median_step_s"] = statistics.median(r["step_s"])
            r["images_per_s"] = batch / r["median_step_s"]
            r["gflop_per_s"] = r["train_gflop_per_image"] * r["images_per_s"]
    ours = {(r["device"], r["malloc"]): r for r in results if r["model"] == "ours" and "skipped" not in r}
    lines = [
        "| model | device | malloc | size | params | s/step (median) | CPU s/step | images/s | ours ÷ this | train GFLOP/img | GFLOP/s | peak memory MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['device']} | {r['malloc']} | | | | | | | | | | skipped: {r['skipped']} |")
            continue
        base = ours.get((r["device"], r["malloc"]))
        r["ours_speedup"] = base["images_per_s"] / r["images_per_s"] if base else None
        ratio = f"{r['ours_speedup']:.2f}x" if base else ""
        lines.append(
            f"| {r['model']} | {r['device']} | {r['malloc']} | {r['size']} | {r['parameters'] / 1e6:.2f}M "
            f"| {r['median_step_s']:.2f} | {statistics.median(r['cpu_s']):.2f} | {r['images_per_s']:.3f} | {ratio} "
            f"| {r['train_gflop_per_image']:.0f} | {r['gflop_per_s']:.0f} | {r['peak_mb']} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="auto", help="auto (cpu, and cuda when present), cpu, cuda or cpu,cuda")
    parser.add_argument("--malloc", choices=("default", "tuned", "both"), default="both", help="CPU allocator settings")
    parser.add_argument("--optimizer", choices=("loop", "foreach", "fused"), default="loop",
                        help="AdamW implementation, the same for every model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast for forward and loss")
    parser.add_argument("--channels-last", action="store_true", help="model and batch in channels-last memory format")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--malloc-label", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.warmup = max(1, args.warmup)
    if args.child:
        print(json.dumps(child(args)))
        return None

    import torch

    devices = ["cpu", "cuda"] if args.device == "auto" else args.device.split(",")
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    settings = ["default", "tuned"] if args.malloc == "both" else [args.malloc]
    models = args.models.split(",")
    load_before = os.getloadavg()
    runs: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        order = models[rnd % len(models):] + models[: rnd % len(models)]
        for device in devices:
            for malloc in settings if device == "cpu" else ["default"]:
                for model in order:
                    row = run_child(args, model, device, malloc)
                    print(f"# round {rnd + 1}: {model} {device} malloc={malloc}: "
                          f"{row.get('skipped') or [round(t, 2) for t in row['step_s']]}", file=sys.stderr)
                    runs.setdefault((device, malloc, models.index(model)), []).append(row)
    results = [merge(runs[k]) for k in sorted(runs)]
    text = table(results, args.batch)
    report = {
        "benchmark": "train_step",
        "batch": args.batch,
        "requested_size": args.size,
        "optimizer": f"AdamW ({args.optimizer})",
        "amp": args.amp,
        "channels_last": args.channels_last,
        "warmup": args.warmup,
        "reps": args.reps,
        "rounds": args.rounds,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if "cuda" in devices else None,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": results,
    }
    print(text)
    print()
    out = json.dumps(report, indent=2)
    print(out)
    if args.json_out:
        from cellseg.fileio import write_text

        write_text(args.json_out, out + "\n")
    return report


if __name__ == "__main__":
    main()
