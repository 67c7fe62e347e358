"""``deepstrf demo`` end to end at a tiny scale, through the CLI in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

TINY = ["--scale", "0.12", "--time-scale", "0.15", "--epochs", "6"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepstrf.cli", "demo", "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, elapsed


def test_demo_writes_report_and_figures(demo_run):
    out, proc, elapsed = demo_run
    assert elapsed < 60
    for name in ("report.md", "report.json", "coverage.png", "scores_per_source.png", "learning_curves.png",
                 "pooled_vs_single.png", "example_neuron.png"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    for fig in rep["figures"].values():
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the job went through stores: sources, then a pool of references
    for src in rep["sources"]:
        assert os.path.isdir(src["url"])
    assert os.path.isdir(rep["pool"]["url"])
    assert "7/7" in proc.stderr  # progress was shown
    md = (out / "report.md").read_text()
    for src in ("AA1", "AA2", "NS1"):
        assert f"| {src} |" in md


def test_demo_scores_finite_and_beat_mean_rate_baseline(demo_run):
    out, _, _ = demo_run
    rep = json.loads((out / "report.json").read_text())
    per_source = rep["scores"]["per_source"]
    assert set(per_source) == {"AA1", "AA2", "NS1"}
    for name, a in per_source.items():
        for key in ("cc_truth", "cc_raw", "cc_norm"):
            assert _finite(a[key]["median"]), (name, key)
        assert _finite(a["nll"]) and _finite(a["nll_baseline"])
        assert a["nll"] < a["nll_baseline"], f"{name}: pooled model no better than the mean-rate baseline"
        assert a["bits_per_spike"] > 0
        assert a["cc_truth"]["median"] > 0.2  # well above chance (0)
    for curve in rep["learning_curves"].values():
        assert all(_finite(v) for v in curve["train_loss"] + curve["heldout_loss"])
    pooling = rep["pooling"]
    assert pooling["source"] == "AA1"
    for v in pooling["variants"].values():
        assert _finite(v["scores"]["cc_truth"]["median"])
    ex = rep["example"]
    assert len(ex["psth"]) == len(ex["truth"]) == len(ex["pred"]["pooled"])
    assert all(_finite(v) for v in ex["pred"]["pooled"])


def test_demo_split_has_no_leakage(demo_run):
    out, _, _ = demo_run
    split = json.loads((out / "report.json").read_text())["split"]
    assert not set(split["train"]) & set(split["test"])
    for part in split["by_source"].values():
        assert part["test"] and part["train"]


def test_demo_refuses_to_clobber_without_overwrite(demo_run):
    out, _, _ = demo_run
    proc = subprocess.run([sys.executable, "-m", "deepstrf.cli", "demo", "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr


def test_demo_against_s3(s3_server, tmp_path):
    """``--store s3://...`` with ``-S`` storage options runs the same job (tiny, few epochs)."""
    root = s3_server.url("demo-run")
    proc = subprocess.run([sys.executable, "-m", "deepstrf.cli", "demo", "--out", str(tmp_path), "--store", root,
                           "-S", f"client_kwargs.endpoint_url={s3_server.endpoint_url}",
                           "--scale", "0.1", "--time-scale", "0.1", "--epochs", "2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["pool"]["url"] == f"{root}/pool.zarr"
    assert all(s["url"].startswith("s3://") for s in rep["sources"])
    assert s3_server.endpoint_url not in json.dumps(rep)  # storage option values are never written down
    for a in rep["scores"]["per_source"].values():
        assert _finite(a["nll"])


def test_fit_in_memory_compact_batches():
    """The demo's training loop on an in-memory pool through ``compact_batches``."""
    from deepstrf.datasets.synthetic import SyntheticAudioDataset
    from deepstrf.demo.training import TrainConfig, build_model, compact_batches, fit, mean_counts

    pool = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.03, seed=1) + \
        SyntheticAudioDataset("aa2", scale=0.04, time_scale=0.03, seed=2)
    cfg = TrainConfig(epochs=4, batch_size=2, channels=(4,), kernel_f=3, kernel_t=5, lr=1e-2)

    def batches(epoch):
        return compact_batches(pool, batch_size=cfg.batch_size, shuffle=True, seed=0, epoch=epoch)

    base = mean_counts(batches(0), pool.N_neurons)
    assert base.shape == (pool.N_neurons,) and (base > 0).all()
    model = build_model(pool.N_neurons, pool.F, cfg, base)
    hist = fit(model, batches, cfg, heldout=batches, progress=False)
    assert len(hist.train_loss) == 4 and hist.train_loss[-1] < hist.train_loss[0]
    assert hist.steps == 4 * len(list(batches(0))) and hist.heldout_epochs[-1] == 4
