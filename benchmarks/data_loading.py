"""Samples/s of batch construction, side by side in one run (issue 2, item 7).

Methods, all building (B, 3, S, S) float32 inputs and (B, S, S) masks from the same data:
  baseline        the original approach: per sample, open the TIFF, read each page the codes
                  need (a random code reads only its chosen page), divide by the page's maximum,
                  combine in numpy, read the PNG mask; one process, like the seed notebooks
  stream          the Zarr store through cellseg's per-sample dataset and a DataLoader
                  (0 workers, and W workers)
  resident ram    cellseg's resident source: needed channels held in RAM, batches built by
                  tensor ops on the CPU
  resident cuda   the same held in GPU memory, built on the GPU (when a GPU is present), and
                  held in pinned RAM with the batch copied to the GPU

The CPU comparison is per core by default (``--threads 1``; DataLoader workers are extra processes).
Each method is timed over whole epochs (so the streaming path's per-epoch worker start-up counts),
the median of ``--rounds`` epochs, methods interleaved so that a busy machine slows all alike.

It writes its own data to a temporary folder: N stacks of 16×S×S uint16 as OME-TIFF (one page per
channel, as `cellseg data synth` and ImageJ write them) with PNG masks, ingested with
`cellseg.data.ingest.ingest`. Prints a markdown table and JSON (``--json-out`` also writes it).

    python benchmarks/data_loading.py [--stacks 64] [--size 400] [--batch 8] [--codes 100,12,103]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from cellseg.data.batches import make_batch_source
from cellseg.data.geometry import Geometry
from cellseg.data.intensity import Normalisation
from cellseg.data.codes import CodePlan, parse_codes, resolve_codes
from cellseg.data.ingest import ingest
from cellseg.data.layouts import load_layout
from cellseg.data.store import open_store
from cellseg.fileio import write_text

LAYOUT = "trainer"


def make_data(folder: Path, stacks: int, size: int, seed: int) -> tuple[Path, Path]:
    """Dataset folder (docs/data.md) of smooth noisy uint16 stacks + its ingested store; returns (root, store)."""
    layout = load_layout(LAYOUT)
    rng = np.random.default_rng(seed)
    root = folder / "data"
    (root / "FullImage").mkdir(parents=True)
    (root / "Mask_Norm").mkdir()
    (root / "codes.txt").write_text("Background\nCell\n")
    yy, xx = np.mgrid[0:size, 0:size] / size
    for n in range(stacks):
        base = np.sin(6 * xx + n) * np.cos(5 * yy - n)
        image = np.empty((layout.n_channels, size, size), dtype=np.uint16)
        for c in range(layout.n_channels):
            noise = rng.normal(0, 0.05, (size, size))
            image[c] = np.clip((base * (c % 5 + 1) / 5 + 1 + noise) * 15000, 0, 65535)
        mask = (base > 0.2).astype(np.uint8)
        tifffile.imwrite(root / "FullImage" / f"stack_{n:04d}.ome.tif", image, ome=True,
                         metadata={"axes": "CYX", "Channel": {"Name": layout.channel_names}})
        Image.fromarray(mask).save(root / "Mask_Norm" / f"stack_{n:04d}.png")
    store = folder / "data.zarr"
    ingest(root, store, layout=LAYOUT, progress=False)
    return root, store


class Baseline:
    """The original per-sample approach, for comparison only (numpy, one process)."""

    def __init__(self, root: Path, ids: list[str], plan: CodePlan, batch: int, seed: int):
        self.root, self.ids, self.plan, self.batch = root, ids, plan, batch
        self.rng = np.random.default_rng(seed)

    def _page(self, tif: tifffile.TiffFile, c: int) -> np.ndarray:
        page = tif.pages[c].asarray().astype(np.float32)
        peak = page.max()
        return page / peak if peak > 0 else np.zeros_like(page)

    def _sample(self, stack_id: str) -> tuple[np.ndarray, np.ndarray]:
        rng, channels = self.rng, []
        with tifffile.TiffFile(self.root / "FullImage" / f"{stack_id}.ome.tif") as tif:
            shape = tif.pages[0].shape
            for r in self.plan.recipes:
                plane = None
                if r.op == "channel":
                    plane = self._page(tif, r.sources[0])
                elif r.op == "random":
                    plane = self._page(tif, r.sources[rng.integers(len(r.sources))])
                elif r.op == "merge":
                    keep = rng.random(len(r.sources)) >= r.merge_p
                    pages = [self._page(tif, c) for c, k in zip(r.sources, keep) if k]
                    plane = sum(pages) / len(r.sources) if pages else None
                if r.drop_p and rng.random() < r.drop_p:
                    plane = None
                channels.append(np.zeros(shape, np.float32) if plane is None else plane)
        mask = np.asarray(Image.open(self.root / "Mask_Norm" / f"{stack_id}.png"))
        return np.stack(channels), mask

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.rng.permutation(self.ids)
        for start in range(0, len(order) - self.batch + 1, self.batch):
            pairs = [self._sample(i) for i in order[start:start + self.batch]]
            yield (torch.from_numpy(np.stack([p[0] for p in pairs])),
                   torch.from_numpy(np.stack([p[1] for p in pairs])).long())


def time_epoch(source, epoch: int, sync: bool) -> tuple[float, int, torch.Tensor]:
    """Seconds for one full epoch (worker start-up included: the streaming path pays it per epoch)."""
    start, samples, x = time.perf_counter(), 0, None
    for x, _ in source.epoch(epoch):
        samples += x.shape[0]
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start, samples, x


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", type=int, default=64)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--codes", default="100,12,103")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per method (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the baseline is single-threaded numpy, so the CPU "
                             "comparison is per core; 0 = torch's default)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="cellseg-bench-"))
    try:
        t0 = time.perf_counter()
        root, store_path = make_data(folder, args.stacks, args.size, args.seed)
        data_s = time.perf_counter() - t0
        store = open_store(store_path)
        plan = resolve_codes(parse_codes(args.codes), store.layout)
        indices = list(range(len(store)))
        # the baseline divides by each page's maximum: cellseg does the same work (data.normalize: max)
        common = {"indices": indices, "plan": plan, "geometry": Geometry("stack", args.size),
                  "normalisation": Normalisation("max"), "batch_size": args.batch,
                  "seed": args.seed, "drop_last": True}

        def cellseg(device: str, residency: str, workers: int = 0) -> Callable[[], object]:
            return lambda: make_batch_source(store, device=device, residency=residency, num_workers=workers, **common)

        methods: list[tuple[str, Callable[[], object], bool]] = [
            ("baseline: TIFF per sample, numpy", lambda: Baseline(root, store.ids, plan, args.batch, args.seed), False),
            ("stream: Zarr, 0 workers", cellseg("cpu", "stream"), False),
            (f"stream: Zarr, {args.workers} workers", cellseg("cpu", "stream", args.workers), False),
            ("resident: RAM, built on CPU", cellseg("cpu", "ram"), False),
        ]
        if torch.cuda.is_available():
            methods += [
                ("resident: pinned RAM, built on GPU", cellseg("cuda", "ram"), True),
                ("resident: GPU memory, built on GPU", cellseg("cuda", "device"), True),
            ]
        sources, results = [], []
        for name, make, sync in methods:
            start = time.perf_counter()
            source = make()
            setup = time.perf_counter() - start
            time_epoch(source, 0, sync)  # warm-up: caches, allocator, CUDA kernels
            sources.append(source)
            results.append({"method": name, "setup_s": setup, "epoch_s": [], "sync": sync})
        for r in range(args.rounds):  # interleaved, so a busy machine slows every method alike
            for source, result in zip(sources, results):
                seconds, samples, x = time_epoch(source, r + 1, result["sync"])
                result["epoch_s"].append(seconds)
                print(f"  round {r + 1} {result['method']}: {samples / seconds:.0f} samples/s", file=sys.stderr)
                result.update(samples_per_epoch=samples, shape=list(x.shape), device=str(x.device))
        for result in results:
            result["samples_per_s"] = result["samples_per_epoch"] / float(np.median(result["epoch_s"]))
            result["ms_per_batch"] = 1000 * args.batch / result["samples_per_s"]
            del result["sync"]
        base = results[0]["samples_per_s"]
        for result in results:
            result["speedup_vs_baseline"] = result["samples_per_s"] / base
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    report = {
        "benchmark": "data_loading",
        "config": {"stacks": args.stacks, "size": args.size, "batch": args.batch, "codes": plan.codes,
                   "needed_channels": plan.needed_channels, "rounds": args.rounds,
                   "workers": args.workers, "seed": args.seed},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]],
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "data_generation_s": data_s,
        "results": results,
    }
    print(f"\nBatch construction, codes {plan.codes}, {args.size}×{args.size}, batch {args.batch}, "
          f"{args.stacks} stacks ({report['machine']['cpus']} CPUs"
          f"{', ' + report['machine']['gpu'] if report['machine']['gpu'] else ''})\n")
    print("| method | samples/s | ms/batch | × baseline | setup s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['samples_per_s']:.0f} | {r['ms_per_batch']:.1f} | "
              f"{r['speedup_vs_baseline']:.1f} | {r['setup_s']:.2f} |")
    text = json.dumps(report, indent=2)
    print("\n" + text)
    if args.json_out:
        write_text(args.json_out, text + "\n")
    return report


if __name__ == "__main__":
    main()
