"""A dataset pushed to an S3-compatible DVC remote (moto on loopback) comes back byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellseg.cli.main import app

pytestmark = pytest.mark.slow  # several dvc/git processes (~1 s each)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_dvc_push_pull_through_s3_remote(s3_endpoint, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        **s3_endpoint.env,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),  # keep DVC's per-repo state out of /var/tmp
    }

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def dvc(*args: str) -> str:
        return run(sys.executable, "-m", "dvc", *args)

    run("git", "init", "-q")
    dvc("init", "-q")
    dataset = repo / "data" / "trainer"
    synth = CliRunner().invoke(app, ["data", "synth", str(dataset), "--cells", "2", "--negatives", "1", "--size", "32"])
    assert synth.exit_code == 0, synth.output
    before = _digests(dataset)
    assert len(before) >= 7  # 3 stacks + 3 masks + codes.txt

    bucket = "cellseg-dvc"
    s3_endpoint.client().create_bucket(Bucket=bucket)
    dvc("add", "data/trainer")
    dvc("remote", "add", "-d", "storage", f"s3://{bucket}/store")
    dvc("remote", "modify", "storage", "endpointurl", s3_endpoint.url)
    dvc("push")
    stored = s3_endpoint.client().list_objects_v2(Bucket=bucket, Prefix="store/").get("KeyCount", 0)
    assert stored >= len(before)  # one object per file, plus the directory listing

    shutil.rmtree(dataset)
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc("pull")
    assert _digests(dataset) == before
