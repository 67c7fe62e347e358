"""Benchmark pool stores; prints one JSON line.

    python scripts/bench_pool.py                       # AA1+AA2 scale
    python scripts/bench_pool.py --scale 0.2 --time-scales 0.05 0.2

Figures:
- ``growth``: for sources of growing T (and so bytes), the pool's bytes and write time
  next to the sources' bytes: the pool must stay flat;
- ``fraction``: pool bytes / source bytes at the largest size (goal < 0.1 %);
- ``open``: time to open the pool locally, and from S3 (a moto server in this process)
  with 20 ms added to every request, next to opening the sources one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import deepstrf
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.store.atomic import stored_bytes
from deepstrf.store.location import Location
from deepstrf.testing.s3 import LocalS3


def save_sources(folder: str, scale: float, time_scale: float) -> list[str]:
    urls = []
    for preset, seed in (("aa1", 1), ("aa2", 2)):
        url = os.path.join(folder, f"{preset}.zarr")
        deepstrf.save_dataset(SyntheticAudioDataset(preset, scale=scale, time_scale=time_scale, seed=seed), url,
                              progress=False)
        urls.append(url)
    return urls


def upload(s3: LocalS3, folder: str, bucket: str) -> None:
    """Copy a local folder into a new bucket of the local S3 server."""
    import s3fs

    s3.make_bucket(bucket)
    s3fs.S3FileSystem(**s3.storage_options()).put(folder.rstrip("/") + "/", f"{bucket}/", recursive=True)


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--time-scales", type=float, nargs="+", default=[0.05, 0.25, 1.0])
    p.add_argument("--latency-ms", type=float, default=20.0)
    args = p.parse_args()
    growth = []
    with tempfile.TemporaryDirectory() as tmp:
        for ts in args.time_scales:
            folder = os.path.join(tmp, f"t{ts}")
            urls = save_sources(folder, args.scale, ts)
            opened = [deepstrf.open_dataset(u) for u in urls]
            pool_url = os.path.join(folder, "pool.zarr")
            t0 = time.perf_counter()
            deepstrf.concat_neural_datasets(opened, names=["aa1", "aa2"], store=pool_url)
            write_s = time.perf_counter() - t0
            growth.append({"time_scale": ts, "source_bytes": sum(stored_bytes(Location.parse(u)) for u in urls),
                           "pool_bytes": stored_bytes(Location.parse(pool_url)), "pool_write_s": round(write_s, 4)})
        largest = growth[-1]
        folder = os.path.join(tmp, f"t{args.time_scales[-1]}")
        local_open, pool = timed(lambda: deepstrf.open_dataset(os.path.join(folder, "pool.zarr")))
        local_sources, _ = timed(lambda: [deepstrf.open_dataset(os.path.join(folder, f"{n}.zarr")) for n in ("aa1", "aa2")])
        with LocalS3() as s3:
            upload(s3, folder, "bench")
            s3.set_latency(args.latency_ms / 1000)
            before = s3.requests
            s3_open, remote = timed(lambda: deepstrf.open_dataset("s3://bench/pool.zarr",
                                                                  storage_options=s3.storage_options()))
            assert remote.get_S() == pool.get_S() and len(remote) == len(pool)
            requests = s3.requests - before
    print(json.dumps({
        "bench": "pool", "scale": args.scale, "growth": growth,
        "pool_fraction_of_sources": largest["pool_bytes"] / largest["source_bytes"],
        "open": {"local_pool_s": round(local_open, 4), "local_sources_s": round(local_sources, 4),
                 "s3_pool_s": round(s3_open, 4), "s3_latency_ms": args.latency_ms,
                 "s3_requests_for_3_opens": requests},
        "S": pool.get_S(), "N": pool.N_neurons,
    }))


if __name__ == "__main__":
    main()
