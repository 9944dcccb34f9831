"""Helpers shared by the experiment command tests (lr-find, sweep-ce, augment preview): a small
encoder at the tiny store's 64 px, the matching CLI options, and the one-line error check."""

from __future__ import annotations

from pathlib import Path

from cellseg.config import Config, load_config

SMALL_ENCODER = "mobilenetv3_small_050"  # the U-Net is built the same on any timm encoder; ~7x faster than resnet18
TINY = ["--size", "64", "--batch-size", "2", "--device", "cpu"]
TINY_FIT = [*TINY, "--epochs-frozen", "1", "--epochs", "1"]


def tiny_config(store, **overrides) -> Config:
    base = {"data.store": str(store), "data.size": 64, "model.encoder": SMALL_ENCODER, "train.batch_size": 2,
            "train.device": "cpu", "seed": 3}
    return load_config(overrides={**base, **overrides})


def small_encoder_file() -> str:
    """A --config file choosing the small encoder (there is no --encoder option), in the test's folder."""
    path = Path("small.yaml")
    path.write_text(f"model:\n  encoder: {SMALL_ENCODER}\n")
    return str(path)


def one_line_error(result, *needles: str) -> str:
    """Exit code 1, no traceback and exactly one ``error:`` line containing every needle; returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def synthetic_store(folder: Path, layout: str, cells: int, negatives: int) -> Path:
    """A synthetic dataset of ``layout`` at 64 px (seed 0) written to ``folder/raw`` and ingested to ``folder/<layout>.zarr``."""
    from cellseg.data.ingest import ingest
    from cellseg.data.synth import synthesize

    synthesize(folder / "raw", layout=layout, cells=cells, negatives=negatives, size=64, seed=0)
    ingest(folder / "raw", folder / f"{layout}.zarr", layout=layout)
    return folder / f"{layout}.zarr"
