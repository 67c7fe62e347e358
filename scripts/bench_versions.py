"""Benchmark versioned sources and pinned pools; prints one JSON line.

    python scripts/bench_versions.py                  # AA1-sized source, K = 10^4 pool
    python scripts/bench_versions.py --scale 0.3 --k 1000

Figures, each next to its baseline:
- ``bytes_per_version`` against ``source_bytes``: what publishing a new version adds (its group,
  manifest and the root index) against the store as first written;
- ``publish_s`` against ``first_save_s``, locally and on S3 (a moto server in this process with
  ``--latency-ms`` added to every request);
- ``open_latest_s`` (a versioned store: root, listing, newest manifest, version root) against
  ``open_plain_s`` (a store never re-published), on S3;
- ``pool_open_pinned_s``: opening a pool of ``--k`` sources, each pinned to a version, without
  opening any source (what every pool of more than 64 sources does), against
  ``pool_open_unpinned_s``, the same pool written without pins (the entries of earlier releases);
  locally (under ``local``) and on S3 with ``--latency-ms`` per request (under ``s3``; the pools
  are written there without latency).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import deepstrf
from deepstrf.datasets.neural_dataset import NeuralDataset
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.store.atomic import stored_bytes
from deepstrf.store.location import Location
from deepstrf.store.pool import write_pool
from deepstrf.testing.s3 import LocalS3


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best, 4)


def publishing(url: str, options: dict | None, scale: float) -> dict:
    """First save, then two re-publishes: times and bytes."""
    t0 = time.perf_counter()
    deepstrf.save_dataset(SyntheticAudioDataset("aa1", scale=scale, seed=1), url, storage_options=options,
                          progress=False)
    first = time.perf_counter() - t0
    size = stored_bytes(Location.parse(url, options))
    times = []
    for seed in (2, 3):
        t0 = time.perf_counter()
        deepstrf.save_dataset(SyntheticAudioDataset("aa1", scale=scale, seed=seed), url, storage_options=options,
                              overwrite=True, progress=False)
        times.append(time.perf_counter() - t0)
    added = (stored_bytes(Location.parse(url, options)) - size) / 2
    return {"first_save_s": round(first, 3), "publish_s": round(min(times), 3), "source_bytes": size,
            "bytes_per_version": int(added)}


def pinned_pool(folder: str, k: int, pinned: bool, options: dict | None = None) -> str:
    """A pool of ``k`` one-stim, one-neuron sources under ``folder`` (a local folder or an S3
    prefix), written from their entries alone (the sources themselves are never opened by a pool
    of more than 64 sources until read)."""
    parts = []
    for i in range(k):
        ds = NeuralDataset(path=f"s{i}", dt_ms=1.0)
        ds.stims, ds.responses = [torch.zeros(1, 1, 4)], [[torch.ones(1, 4)]]
        ds.stim_meta, ds.nrn_meta, ds.N_neurons = [{"uid": f"s{i}"}], [{"uid": f"n{i}"}], 1
        ds.store_url, ds.fingerprint = f"{folder}/s{i:05d}.zarr", f"sha256:{i:064x}"
        ds.version_path = f"versions/20260101T000000000000Z-{i:08x}" if pinned else ""
        parts.append(ds)
    url = f"{folder}/pool-{'pinned' if pinned else 'plain'}.zarr"
    write_pool(parts, url, storage_options=options, overwrite=True, trust=True, allowed_roots=[folder])
    return url


def pool_opening(folder: str, k: int, options: dict | None = None, before_open=lambda: None) -> dict:
    """Opening times of a pinned and an unpinned pool of ``k`` sources (``before_open``: called
    once both are written)."""
    urls = {pinned: pinned_pool(folder, k, pinned, options) for pinned in (True, False)}
    before_open()
    return {f"pool_open_{'pinned' if pinned else 'unpinned'}_s":
            best_of(lambda url=url: deepstrf.open_dataset(url, storage_options=options, check_sources=False,
                                                          trust=True))
            for pinned, url in urls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="size of the AA1-like source")
    p.add_argument("--k", type=int, default=10_000, help="sources of the pinned pool")
    p.add_argument("--latency-ms", type=float, default=20.0)
    args = p.parse_args()
    out: dict = {"scale": args.scale, "k": args.k, "latency_ms": args.latency_ms}
    with tempfile.TemporaryDirectory() as folder:
        out["local"] = publishing(os.path.join(folder, "a.zarr"), None, args.scale)
        with LocalS3(latency_s=args.latency_ms / 1000) as s3:
            s3.make_bucket("bench")
            options = s3.storage_options()
            out["s3"] = publishing("s3://bench/a.zarr", options, args.scale)
            deepstrf.save_dataset(SyntheticAudioDataset("aa1", scale=args.scale, seed=1), "s3://bench/plain.zarr",
                                  storage_options=options, progress=False)
            out["s3"]["open_latest_s"] = best_of(lambda: deepstrf.open_dataset("s3://bench/a.zarr",
                                                                               storage_options=options))
            out["s3"]["open_plain_s"] = best_of(lambda: deepstrf.open_dataset("s3://bench/plain.zarr",
                                                                              storage_options=options))
            s3.set_latency(0.0)  # 2 x 10^4 entries written quickly, opened at the latency asked for
            out["s3"].update(pool_opening("s3://bench/pools", args.k, options,
                                          lambda: s3.set_latency(args.latency_ms / 1000)))
        out["local"].update(pool_opening(folder, args.k))
    for where in ("local", "s3"):
        figures = out[where]
        figures["pool_open_pinned_vs_unpinned"] = round(figures["pool_open_pinned_s"] /
                                                        max(figures["pool_open_unpinned_s"], 1e-9), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
