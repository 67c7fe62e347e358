#!/usr/bin/env python
"""Blosc word size of 1-byte counts: stored size, decoding and a streamed epoch; prints ONE JSON line.

    python scripts/bench_codec.py [--scale 1] [--time-scale 1] [--epochs 6] [--workdir DIR]

The AA1+AA2-sized pool of ``bench_stream.py`` is written twice, its ``uint8`` counts
bit-shuffled by blosc in 1-byte words (``format.BITSHUFFLE_MIN_TYPESIZE = 1``, as earlier
deepstrf wrote them) and in 2-byte words (what deepstrf writes), everything else equal. For
each: the counts' bytes on disk and compression against their decoded size; one thread decoding
every shard of the counts (deepstrf's reader, one shard per read, the second of two runs;
files in the page cache); and epochs of ``StreamingNeuralDataset(...).loader(num_workers=0)`` (batch 8,
shuffled, compact), the two pools alternating in one process: median items/s and the CPU time
of the process per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_stream  # noqa: E402

WORD_SIZES = (1, 2)


def build(workdir: Path, scale: float, time_scale: float, word: int) -> tuple[str, list[str]]:
    """The pool and its sources with counts bit-shuffled in ``word``-byte words."""
    from deepstrf.store import format as fmt

    kept = fmt.BITSHUFFLE_MIN_TYPESIZE
    fmt.BITSHUFFLE_MIN_TYPESIZE = word
    try:
        pool, sources, _ = bench_stream.build_stores(workdir, scale, time_scale)
    finally:
        fmt.BITSHUFFLE_MIN_TYPESIZE = kept
    return pool, sources


def stored_counts(sources: list[str]) -> dict:
    """Bytes of the counts on disk and decoded, over all sources."""
    import zarr

    from deepstrf.store import format as fmt

    on_disk = decoded = 0
    for url in sources:
        folder = Path(url) / fmt.VALUES
        on_disk += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
        arr = zarr.open_group(url, mode="r")[fmt.VALUES]
        decoded += arr.nbytes
    return {"counts_stored_bytes": on_disk, "counts_decoded_bytes": decoded, "compression": round(decoded / on_disk, 2)}


def decode_rate(sources: list[str]) -> float:
    """GB/s of one thread decoding every shard of the counts (whole shards, deepstrf's reader)."""
    from deepstrf.store import format as fmt
    from deepstrf.store import shards

    shards.set_decode_threads(1)
    try:
        for _ in range(2):  # the second run counts: files in the page cache, readers warm
            start = time.perf_counter()
            nbytes = bench_stream.read_every_chunk(sources, (fmt.VALUES,), shards_per_read=1)
            rate = nbytes / (time.perf_counter() - start) / 1e9
        return round(rate, 3)
    finally:
        shards.set_decode_threads(None)


def epochs(pools: dict[int, str], n: int) -> dict[int, dict]:
    """``n`` epochs of each pool without workers, alternating: median items/s and CPU s per epoch."""
    from deepstrf.stream import StreamingNeuralDataset

    datasets = {w: StreamingNeuralDataset(p, shuffle=True, seed=0, batch_size=bench_stream.BATCH, collate="compact")
                for w, p in pools.items()}
    runs: dict[int, list[tuple[float, float]]] = {w: [] for w in pools}
    for epoch in range(n):
        for word, ds in datasets.items():
            ds.set_epoch(epoch)
            cpu, wall, items = time.process_time(), time.perf_counter(), 0
            for batch in ds.loader(num_workers=0):
                items += len(batch["stim_meta"])
            runs[word].append((items / (time.perf_counter() - wall), time.process_time() - cpu))
    return {w: {"items_per_s": round(statistics.median(r[0] for r in rs), 1),
                "cpu_s_per_epoch": round(statistics.median(r[1] for r in rs), 3),
                "runs_items_per_s": [round(r[0], 1) for r in rs]} for w, rs in runs.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="factor on S and N of the AA1/AA2 presets")
    p.add_argument("--time-scale", type=float, default=1.0, help="factor on T")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each pool (alternating)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "deepstrf-bench-stream"))
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    built = {w: build(workdir, args.scale, args.time_scale, w) for w in WORD_SIZES}
    out: dict = {"bench": "codec", "scale": args.scale, "time_scale": args.time_scale}
    for word, (_, sources) in built.items():
        out[f"word_{word}"] = {**stored_counts(sources), "decode_gb_per_s_one_thread": decode_rate(sources)}
    for word, figures in epochs({w: pool for w, (pool, _) in built.items()}, args.epochs).items():
        out[f"word_{word}"]["epoch_w0"] = figures
    one, two = out["word_1"], out["word_2"]
    out["ratios"] = {
        "stored_2_over_1": round(two["counts_stored_bytes"] / one["counts_stored_bytes"], 3),
        "decode_2_over_1": round(two["decode_gb_per_s_one_thread"] / one["decode_gb_per_s_one_thread"], 3),
        "epoch_items_per_s_2_over_1": round(two["epoch_w0"]["items_per_s"] / one["epoch_w0"]["items_per_s"], 3),
        "epoch_cpu_2_over_1": round(two["epoch_w0"]["cpu_s_per_epoch"] / one["epoch_w0"]["cpu_s_per_epoch"], 3),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
