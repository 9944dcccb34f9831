"""benchmarks/gpu_check.sh in --dry-run (no GPU, nothing installed or run) and the pure parts of its report."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
_SPEC = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)

STEPS = ["0 install", "1 CUDA-only tests", "2 one training step", "3 batch construction", "4 short training",
         "5 torchrun"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OUT"}
    environ.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env=environ, timeout=30, cwd=tmp_path)


def test_dry_run_lists_every_step_with_its_command_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    done = dry_run(tmp_path, "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    table = text[text.index("| step | status |"):]
    for name in STEPS:
        assert re.search(rf"^\| {re.escape(name)}.* \| SKIPPED \(dry run\) \|", table, re.M), name
    # the exact commands, naming the right scripts and options
    assert "make install && echo" in text
    for test in ("tests/test_codes.py::test_apply_on_cuda_matches_cpu",
                 "tests/test_dataset.py::test_batches_on_cuda_match_cpu",
                 "tests/test_engine_augment.py::test_runs_on_the_gpu"):
        assert test in text
    assert "benchmarks/train_step.py --device cuda" in text and "--amp bf16 --channels-last" in text
    assert "benchmarks/data_loading.py" in text
    assert re.search(r"cellseg data synth .*--size 400", text)
    assert re.search(r"cellseg train .*--size 400 --device cuda .*--epochs-frozen 2 --epochs 8", text)
    assert re.search(r"python -m torch.distributed.run --nproc-per-node 1 \S*cellseg train .*--epochs 1", text)
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and summary.count("SKIPPED (dry run)") == len(STEPS)
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]  # nothing run, no logs


def test_out_defaults_to_the_runners_out_variable(tmp_path):
    done = dry_run(tmp_path, env={"OUT": str(tmp_path / "runner")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runner" / "summary.md").exists()


def test_bad_option_is_one_line_exit_2(tmp_path):
    done = dry_run(tmp_path, "--bogus")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--bogus" in done.stderr


def test_every_test_that_skips_without_cuda_is_in_the_script():
    script = SCRIPT.read_text()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("@pytest.mark.skipif") and "cuda.is_available" in line:
                name = next(re.match(r"\s*def (\w+)", l).group(1) for l in lines[i + 1:] if re.match(r"\s*def ", l))
                assert f"tests/{path.name}::{name}" in script, f"{path.name}::{name} missing from gpu_check.sh"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.0), ("Tesla V100-SXM2-16GB", None),
])
def test_datasheet_peak_by_device_name(name, peak):
    assert report.datasheet_peak(name) == peak


def test_train_step_table_gives_percent_of_peak(tmp_path, capsys):
    peak = tmp_path / "peak.json"
    peak.write_text(json.dumps({"device": "NVIDIA H200", "datasheet_bf16_dense_tflops": 989.0,
                                "measured_bf16_matmul_tflops": 790.0}))
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"amp": "bf16", "channels_last": True, "results": [
        {"model": "ours", "images_per_s": 200.0, "gflop_per_s": 200 * 461.0, "peak_mb": 9000},
        {"model": "smp", "skipped": "not installed (segmentation_models_pytorch)"}]}))
    report.main(["train-step", str(peak), str(step), str(tmp_path / "missing.json")])
    text = capsys.readouterr().out
    assert "| ours | bf16, channels-last | 200.0 | 92.2 | 9.3 | 11.7 | 9000 |" in text
    assert text.strip().splitlines()[-1] == "KEY: ours 200 img/s (bf16, channels-last), 9.3 % of bf16 peak"


def test_training_figures_from_metrics_and_mlflow_timestamps(tmp_path, capsys):
    import sqlite3

    run = tmp_path / "run"
    run.mkdir()
    history = [{"epoch": e, "phase": 1 if e <= 2 else 2, "accuracy": 0.9, "dice": 0.8, "iou": 0.7, "val_loss": 0.2}
               for e in range(1, 11)]
    (run / "metrics.json").write_text(json.dumps(history))
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE metrics (key TEXT, value REAL, timestamp INTEGER, run_uuid TEXT, step INTEGER)")
    times = {1: 0, 2: 2000, 3: 5000}  # ms: the frozen epoch 2 s, unfrozen 3 s
    times.update({e: 5000 + 3000 * (e - 3) for e in range(4, 11)})
    con.executemany("INSERT INTO metrics VALUES ('val_loss', 0.2, ?, 'r', ?)",
                    [(1_000_000 + t, e) for e, t in times.items()])
    con.commit()
    con.close()
    report.main(["training", str(run), str(db), "--stacks", "90", "--wall", "60"])
    text = capsys.readouterr().out
    assert "| 10 | 2.00 | 3.00 | 0.90 | 0.80 | 0.70 | 0.20 |" in text
    # 450/90 x (5 x 2 s + 100 x 3 s) = 1550 s
    assert "1550 s" in text and text.strip().endswith("paper profile ≈ 25.8 min")


def test_predict_benchmark_reports_throughput_against_the_matmul_limit(tmp_path):
    """benchmarks/predict.py (issue 15, item 2), tiny: every figure present and consistent."""
    spec = importlib.util.spec_from_file_location("predict_benchmark", ROOT / "benchmarks" / "predict.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "predict.json"
    result = bench.main(["--size", "64", "--batch", "2", "--reps", "1", "--matmul", "256", "--threads", "1",
                         "--contiguous", "--json-out", str(out)])
    assert json.loads(out.read_text())["results"] == result["results"]
    assert result["fp32_matmul_gflops"] > 0 and result["gflop_per_tile_forward"] > 0
    assert [r["method"].split(",")[0] for r in result["results"]] == ["predict_tiled", "plain forward"]
    for r in result["results"]:
        assert r["megapixels_per_s"] == pytest.approx(r["tiles_per_s"] * 64 * 64 / 1e6)
        assert r["percent_of_matmul"] == pytest.approx(100 * r["gflop_per_s"] / result["fp32_matmul_gflops"])
