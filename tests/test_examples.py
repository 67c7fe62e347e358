"""Every example script runs at a tiny scale (in a subprocess, like a user would run it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=EXAMPLES, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, f"{name} printed a traceback:\n{proc.stderr[-4000:]}"
    return proc


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == {"pool_two_stores.py", "stream_from_s3.py", "share_pool.py", "train_evaluate.py",
                       "import_nwb.py", "train_lightning.py", "cluster_slurm.py"}


def test_cluster_slurm_builds_the_cluster_and_its_job_script():
    pytest.importorskip("dask_jobqueue")
    out = run_example("cluster_slurm.py", "--cores", "4", "--memory", "8GB", "--queue", "normal")
    assert "#SBATCH -p normal" in out.stdout and "#SBATCH --mem=" in out.stdout
    assert "--nworkers 4" in out.stdout and "--nthreads 1" in out.stdout


def test_pool_two_stores(tmp_path):
    for _ in range(2):  # a re-run into the same folder replaces the example's own stores
        out = run_example("pool_two_stores.py", "--root", str(tmp_path))
        assert "pool " in out.stdout and (tmp_path / "pool.zarr").is_dir()


def test_share_pool_local(tmp_path):
    out = run_example("share_pool.py", "--root", str(tmp_path / "lab-a"))
    assert "lab B opened" in out.stdout and "refused as expected" in out.stdout


def test_train_evaluate_leaves_no_temporary_folder(tmp_path):
    out = run_example("train_evaluate.py", env={"TMPDIR": str(tmp_path)})  # no --root: a temporary folder
    assert "AA1:" in out.stdout and "NS1:" in out.stdout
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("deepstrf-train-")]


@pytest.mark.parametrize("ddp", [[], ["--devices", "2", "--workers", "2"]], ids=["one-process", "ddp-workers"])
def test_train_lightning(tmp_path, ddp):
    pytest.importorskip("lightning")
    out = run_example("train_lightning.py", "--root", str(tmp_path), *ddp)
    assert "trained 2 epochs" in out.stdout and "test loss" in out.stdout


@pytest.mark.parametrize("script", ["stream_from_s3.py", "share_pool.py"])
def test_s3_examples(s3_server, script):
    root = f"s3://{s3_server.bucket}/examples-{uuid.uuid4().hex[:8]}"
    out = run_example(script, "--root", root, "--endpoint-url", s3_server.endpoint_url)
    if script == "stream_from_s3.py":
        assert "epoch 1:" in out.stdout
    else:
        assert "refused as expected" in out.stdout


def test_import_nwb(tmp_path):
    for _ in range(2):  # a re-run imports files made anew: their stores are replaced
        out = run_example("import_nwb.py", "--root", str(tmp_path))
        assert out.stdout.count("imported: ") == 2 and "pool 9 stims x 13 neurons" in out.stdout
    assert "trained " in out.stdout and (tmp_path / "stores" / "lab-b-session.zarr").is_dir()
