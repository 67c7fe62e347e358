"""Benchmark the Zarr source store at AA1 + AA2 scale; prints one JSON line.

    python scripts/bench_store.py [--scale 1.0] [--time-scale 1.0] [--latency-ms 20] [--no-s3]

Measures, in one run: bytes on disk vs float32 in memory, save and open time,
a full epoch of ``ds[i]`` (and of DataLoader + ``neural_collate``) from a
local store vs the same data in memory (``to_memory()``), and save / open /
epoch over S3 (a moto server in this process) with ``--latency-ms`` added to
every S3 request by wrapping s3fs' single request funnel ``_call_s3``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.data import DataLoader

from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.testing.s3 import LocalS3
from deepstrf.store import open_dataset, save_dataset
from deepstrf.utils.data import neural_collate


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def epoch_items(ds) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0


def epoch_collate(ds, batch_size: int = 8) -> float:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=neural_collate,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def open_time(url: str, storage_options=None, repeats: int = 3) -> float:
    return statistics.median(timed(open_dataset, url, storage_options=storage_options)[1] for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="factor on S and N of the AA1/AA2 presets")
    p.add_argument("--time-scale", type=float, default=1.0, help="factor on T")
    p.add_argument("--latency-ms", type=float, default=20.0, help="latency added to every S3 request")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 measurements")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    sources = {name: SyntheticAudioDataset(name, scale=args.scale, time_scale=args.time_scale, seed=k + 1).to_memory()
               for k, name in enumerate(("aa1", "aa2"))}
    out: dict = {"scale": args.scale, "time_scale": args.time_scale, "generate_s": time.perf_counter() - t0,
                 "S": sum(d.get_S() for d in sources.values()), "N": sum(d.N_neurons for d in sources.values())}

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        urls = {name: os.path.join(tmp, f"{name}.zarr") for name in sources}
        out["save_local_s"] = sum(timed(save_dataset, d, urls[n], progress=False)[1] for n, d in sources.items())
        opened = {n: open_dataset(u) for n, u in urls.items()}
        attrs = [d.responses.reader.attrs for d in opened.values()]
        out["bytes_on_disk"] = sum(a["nbytes_stored"] for a in attrs)
        out["bytes_float32"] = sum(a["stats"]["float32_bytes"] for a in attrs)
        out["compression_ratio"] = out["bytes_float32"] / out["bytes_on_disk"]
        out["open_local_s"] = open_time(urls["aa2"])

        lazy = opened["aa1"] + opened["aa2"]
        memory = sources["aa1"] + sources["aa2"]
        out["items"] = len(lazy)
        out["epoch_items_local_s"] = epoch_items(lazy)
        out["epoch_items_memory_s"] = epoch_items(memory)
        out["epoch_collate_local_s"] = epoch_collate(lazy)
        out["epoch_collate_memory_s"] = epoch_collate(memory)

    if not args.no_s3:
        with LocalS3() as server:
            options = server.storage_options()
            server.make_bucket("bench")
            server.set_latency(args.latency_ms / 1000)
            out["s3_latency_ms"] = args.latency_ms
            s3 = {n: f"s3://bench/{n}.zarr" for n in sources}
            out["save_s3_s"] = sum(timed(save_dataset, d, s3[n], storage_options=options, progress=False)[1]
                                   for n, d in sources.items())
            out["open_s3_s"] = open_time(s3["aa2"], options)
            remote = open_dataset(s3["aa1"], storage_options=options) + open_dataset(s3["aa2"], storage_options=options)
            out["epoch_items_s3_s"] = epoch_items(remote)

    out["goals"] = {
        "disk_le_1/20_float32": out["compression_ratio"] >= 20,
        "local_items_not_slower_than_memory": out["epoch_items_local_s"] <= out["epoch_items_memory_s"],
        "local_collate_epoch_not_slower_than_memory": out["epoch_collate_local_s"] <= out["epoch_collate_memory_s"],
    }
    if "open_s3_s" in out:
        out["goals"]["open_s3_le_0.5s"] = out["open_s3_s"] <= 0.5
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
