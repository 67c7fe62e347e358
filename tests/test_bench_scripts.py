"""The GPU training benchmark, the compact-batch microbenchmark, the codec benchmark, the page-cost and
the batch-reading benchmarks run (tiny, on the CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_codec  # noqa: E402
import bench_compact  # noqa: E402
import bench_gpu  # noqa: E402
import bench_pages  # noqa: E402
import bench_receive  # noqa: E402


def test_bench_gpu_runs_every_configuration_on_the_cpu(tmp_path, capsys):
    out = bench_gpu.main(["--device", "cpu", "--scale", "0.02", "--time-scale", "0.02", "--workers", "0",
                          "--epochs", "1", "--channels", "2", "--workdir", str(tmp_path)])
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    configs = out["configs"]
    assert set(configs) == {"bound", "memory", "loader_w0", "compact_w0", "dense_device_w0"}
    assert configs["bound"]["fraction_of_bound"] == 1.0
    assert all(c["items_per_s"] > 0 and c["fraction_of_bound"] > 0 for c in configs.values())


def test_bench_compact_reports_ratios():
    out = bench_compact.main(["--items", "2", "--neurons", "5", "--repeats", "3", "--bins", "50", "--runs", "1"])
    assert out["batch"]["cells"] == 10
    assert out["step_operations"]["total"] == sum(v for k, v in out["step_operations"].items() if k != "total") > 0
    fewer = bench_compact.main(["--items", "2", "--neurons", "5", "--repeats", "3", "--bins", "50", "--runs", "1",
                                "--accelerator-path"])
    assert fewer["accelerator_path"] and fewer["step_operations"]["predict"] < out["step_operations"]["predict"]
    assert all(out[k] > 0 for k in ("repeat_sum_over_counts_pass", "loss_forward_over_counts_pass",
                                    "to_dense_over_dense_pass"))


def test_bench_codec_writes_both_word_sizes_and_compares_them(tmp_path, capsys):
    import json

    out = bench_codec.main(["--scale", "0.05", "--time-scale", "0.2", "--epochs", "1", "--workdir", str(tmp_path)])
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    words = {}
    for meta in tmp_path.glob("stores-*/aa2/responses/values/zarr.json"):
        inner = json.loads(meta.read_text())["codecs"][0]["configuration"]["codecs"]
        words[meta.parts[-5]] = next(c["configuration"]["typesize"] for c in inner if c["name"] == "blosc")
    assert sorted(words.values()) == [1, 2]
    one, two = out["word_1"], out["word_2"]
    assert one["counts_decoded_bytes"] == two["counts_decoded_bytes"] > 0
    assert all(w["compression"] > 1 and w["decode_gb_per_s_one_thread"] > 0 and w["epoch_w0"]["items_per_s"] > 0
               for w in (one, two))
    assert set(out["ratios"]) == {"stored_2_over_1", "decode_2_over_1", "epoch_items_per_s_2_over_1",
                                  "epoch_cpu_2_over_1"}


def test_bench_pages_splits_the_cost_of_shared_memory(capsys):
    out = bench_pages.main(["--mib", "4", "--repeat", "1", "--idle", "0"])
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    assert all(out[k] > 0 for k in ("private_numpy_ms_per_gib", "private_torch_ms_per_gib", "shared_ms_per_gib",
                                    "shared_vs_private_numpy"))
    split = (out["shared_allocate_ms_per_gib"], out["shared_map_allocated_ms_per_gib"])
    if hasattr(os, "memfd_create"):  # memory files: allocating and mapping timed apart
        assert all(ms > 0 for ms in split)
    else:
        assert split == (None, None)
    assert out["private_numpy_after_idle_ms_per_gib"] is None  # --idle 0 skips them


def test_bench_receive_times_reading_batches_from_workers_and_from_the_main_process(tmp_path, capsys):
    out = bench_receive.main(["--scale", "0.02", "--time-scale", "0.05", "--epochs", "2", "--repeat", "1",
                              "--workdir", str(tmp_path)])
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
    for k in ("w0", "w2"):
        assert len(out[k]["read_ms_per_gib"]) == 2 and all(ms > 0 for ms in out[k]["read_ms_per_gib"])
        assert out[k]["read_bytes"][0] == out[k]["read_bytes"][1] > 0  # every batch's bytes, each epoch
    assert out["w0"]["read_bytes"] == out["w2"]["read_bytes"]
    assert set(out["ratios"]) == {f"{name}_w2_over_w0_{when}" for name in ("read", "read_cpu")
                                  for when in ("first_epoch", "later_epochs")}
