"""Benchmark in-memory concatenation and batching; prints one JSON line.

    python scripts/bench_concat.py                 # AA1+AA2 scale (about 5 GB of float32 responses)
    python scripts/bench_concat.py --scale 0.2     # smaller

Figures:
- ``concat``: time and traced memory of ``concat_neural_datasets`` for in-memory
  sources of growing T*R, next to the eager S x N grid deepSTRF builds, in the same run;
- ``first_mask``: first ``nrn_masks`` on the AA1+AA2 pool (ours assembles it from the
  sources' masks; the baseline scans every cell of the pooled grid);
- ``epoch``: one DataLoader epoch (batch 8, shuffled, no workers) over the AA1+AA2 pool
  held in memory, dense ``neural_collate`` vs ``compact_collate``: items/s, time to
  first batch and peak RSS. Each format runs in its own process so peaks do not mix.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
import tracemalloc

import torch
from torch.utils.data import DataLoader

from deepstrf.datasets import NeuralDataset
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.utils.data import compact_collate, concat_neural_datasets, neural_collate


def plain_source(S: int, N: int, T: int, R: int, seed: int) -> NeuralDataset:
    """An in-memory source filled like a deepSTRF loader does (lists of tensors)."""
    ds = NeuralDataset(path=f"bench{seed}", dt_ms=1.0)
    ds.stims = [torch.zeros(1, 32, T) for _ in range(S)]
    cell = torch.ones(R, T)
    ds.responses = [[cell for _ in range(N)] for _ in range(S)]  # shared tensor: cheap to build
    ds.stim_meta = [{"uid": f"{seed}-s{s}"} for s in range(S)]
    ds.nrn_meta = [{"uid": f"{seed}-n{n}"} for n in range(N)]
    ds.N_neurons = N
    return ds


def eager_grid(sources: list[NeuralDataset]) -> list[list[torch.Tensor]]:
    """The full S x N grid of references, as deepSTRF 0.1.0 builds it."""
    N = sum(d.N_neurons for d in sources)
    nan = torch.full((1, 1), float("nan"))
    rows, n0 = [], 0
    for d in sources:
        for s in range(d.get_S()):
            rows.append([nan] * n0 + list(d.responses[s]) + [nan] * (N - n0 - d.N_neurons))
        n0 += d.N_neurons
    return rows


def timed_traced(fn) -> tuple[float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak


def bench_concat_growth(scale: float) -> list[dict]:
    S1, N1, S2, N2 = max(2, round(30 * scale)), max(2, round(100 * scale)), max(2, round(117 * scale)), max(2, round(494 * scale))
    out = []
    for T, R in ((100, 1), (1000, 10), (4000, 20)):
        a, b = plain_source(S1, N1, T, R, 1), plain_source(S2, N2, T, R, 2)
        ours_s, ours_b = timed_traced(lambda: concat_neural_datasets([a, b]))
        eager_s, eager_b = timed_traced(lambda: eager_grid([a, b]))
        out.append({"T": T, "R": R, "concat_s": round(ours_s, 5), "concat_bytes": ours_b,
                    "eager_grid_s": round(eager_s, 5), "eager_grid_bytes": eager_b})
    return out


def aa_pool(scale: float, time_scale: float) -> NeuralDataset:
    aa1 = SyntheticAudioDataset("aa1", scale=scale, time_scale=time_scale, seed=1).to_memory()
    aa2 = SyntheticAudioDataset("aa2", scale=scale, time_scale=time_scale, seed=2).to_memory()
    return aa1, aa2


def bench_first_mask(scale: float, time_scale: float) -> dict:
    aa1, aa2 = aa_pool(scale, time_scale)
    pool = concat_neural_datasets([aa1, aa2])
    t0 = time.perf_counter()
    pool.nrn_masks
    ours = time.perf_counter() - t0
    eager = NeuralDataset(path="eager", dt_ms=1.0)
    eager.responses, eager.N_neurons = eager_grid([aa1, aa2]), pool.N_neurons
    t0 = time.perf_counter()
    eager.nrn_masks
    base = time.perf_counter() - t0
    assert torch.equal(eager.nrn_masks, pool.nrn_masks)
    return {"ours_s": round(ours, 4), "scan_s": round(base, 4), "speedup": round(base / max(ours, 1e-9), 1)}


def bench_epoch(fmt: str, scale: float, time_scale: float) -> dict:
    aa1, aa2 = aa_pool(scale, time_scale)
    pool = concat_neural_datasets([aa1, aa2])
    collate = neural_collate if fmt == "dense" else functools.partial(compact_collate, neuron_index=pool.selected_neurons())
    loader = DataLoader(pool, batch_size=8, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    first, items = None, 0
    for batch in loader:
        first = first or time.perf_counter() - t0
        items += len(batch["stim_meta"])
    elapsed = time.perf_counter() - t0
    return {"items": items, "items_per_s": round(items / elapsed, 2), "first_batch_s": round(first, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="factor on S and N")
    p.add_argument("--time-scale", type=float, default=1.0, help="factor on T")
    p.add_argument("--epoch-only", choices=["dense", "compact"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epoch_only:
        print(json.dumps(bench_epoch(args.epoch_only, args.scale, args.time_scale)))
        return
    epochs = {}
    for fmt in ("dense", "compact"):
        res = subprocess.run([sys.executable, __file__, "--scale", str(args.scale), "--time-scale",
                              str(args.time_scale), "--epoch-only", fmt], capture_output=True, text=True, check=True)
        epochs[fmt] = json.loads(res.stdout.strip().splitlines()[-1])
    epochs["compact_vs_dense_items_per_s"] = round(epochs["compact"]["items_per_s"] / epochs["dense"]["items_per_s"], 2)
    print(json.dumps({
        "bench": "concat", "scale": args.scale, "time_scale": args.time_scale,
        "concat": bench_concat_growth(args.scale),
        "first_mask": bench_first_mask(args.scale, args.time_scale),
        "epoch": epochs,
    }))


if __name__ == "__main__":
    main()
