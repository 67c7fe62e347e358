"""Benchmark pools of many small sources; prints one JSON line per K.

    python scripts/bench_scale.py                      # K = 10, 100, 1000, 10000
    python scripts/bench_scale.py --ks 10 1000 --epoch-items 5000
    python scripts/bench_scale.py --plot lines.jsonl docs/scale.png   # the figure of saved lines

Each source is 10 stims x 20 neurons, T = 100 bins, 3 repeats (every pair
recorded but a few per source). Sources are made once (the first with
``save_dataset``, the others as copies of it given their own name, uids and
fingerprint) and cached in ``--cache``. For each K:

- in one process, ``sources_open_s`` + ``pool_write_s``: open the K sources and write their
  pool (``deepstrf concat``); ``pool_bytes`` against ``sources_bytes``; ``write_peak_rss_mib``;
- in another (``read_peak_rss_mib``):
- ``open_s``, ``len_s``, ``select_s`` (``select_pop_by_nrn_attr`` over all N
  neurons), ``stream_open_s`` (``StreamingNeuralDataset(url)``), ``first_batch_s``
  and ``items_per_s`` (2 persistent DataLoader workers, batch 8: ``--epoch-items`` items timed
  after ``--warm-items`` items that follow the first batch (``warm_items_per_s``), over as many
  epochs as that takes; ``loader_s`` starts the workers' forkserver; ``lead_batches_first_pass``:
  batches this process read itself while its workers started),
  peak RSS of the process and the peak PSS of it and its workers together (sampled every 50
  batches);
- over S3 (the local moto server, 20 ms added to every request): ``open_s``,
  ``len_s``, ``select_s``, ``stream_open_s`` with only the pool uploaded (a
  format-2 pool opens no source), and ``first_batch_s`` where the sources are
  uploaded too (K <= ``--s3-sources-max``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SPEC = dict(name="K", n_stims=10, n_neurons=20, F=32, dt_ms=1.0, T_range=(100, 100), repeats=3, coverage=0.97,
            species="zebra finch", areas=("MLd", "OV", "CM"))


def source_url(folder: str, i: int) -> str:
    return os.path.join(folder, f"s{i:05d}.zarr")


def make_sources(folder: str, k: int) -> list[str]:
    """Sources 0..k-1 in ``folder`` (made if missing): a template, then renamed copies."""
    import zarr

    import deepstrf
    from deepstrf.datasets.synthetic import SourceSpec, SyntheticAudioDataset
    from deepstrf.store import format as fmt
    from deepstrf.store.atomic import consolidate
    from deepstrf.store.integrity import fingerprint
    from deepstrf.store.jsonmeta import decode_meta, encode_meta
    from deepstrf.store.writer import _write_small

    os.makedirs(folder, exist_ok=True)
    template = source_url(folder, 0)
    if not os.path.exists(template):
        deepstrf.save_dataset(SyntheticAudioDataset(SourceSpec(**SPEC), seed=0), template, progress=False)
    base = zarr.open_group(template, mode="r")
    metas = {name: decode_meta(np.asarray(base[name][...]).tobytes()) for name in (fmt.STIM_META, fmt.NRN_META)}
    for i in range(1, k):
        url = source_url(folder, i)
        if os.path.exists(url):
            continue
        tmp = url + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(template, tmp)
        group = zarr.open_group(tmp, mode="r+")
        attrs = dict(group.attrs)
        digests = dict(attrs["arrays"])
        for name, items in metas.items():
            renamed = [{**m, "uid": m["uid"].replace("-0-", f"-{i}-")} for m in items]
            del group[name]
            _write_small(group, name, np.frombuffer(encode_meta(renamed, name), dtype=np.uint8), digests, text=True)
        attrs.update(name=f"K{i:05d}", arrays=dict(sorted(digests.items())))
        attrs["fingerprint"] = fingerprint(attrs)
        group.update_attributes(attrs)
        consolidate(group.store)
        os.rename(tmp, url)
    return [source_url(folder, i) for i in range(k)]


def peak_rss_mib() -> float:
    """Peak RSS of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pss_mib() -> float:
    """Proportional set size of this process and its DataLoader workers together (shared pages
    counted once, split between the processes that share them; the idle forkserver left out), MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_full_info().pss
    for p in me.children(recursive=True):
        try:
            if p.ppid() == me.pid and "forkserver" in " ".join(p.cmdline()):
                continue  # the idle server the workers are forked from
            total += p.memory_full_info().pss
        except psutil.Error:  # a worker gone while we looked
            continue
    return total / 2**20


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 4)


def measure_reads(url: str, storage_options: dict | None, epoch_items: int, stream: bool, warm_items: int = 0) -> dict:
    """Open, len, select, streaming open (and first batch / items/s when ``stream``) of the pool at ``url``."""
    import deepstrf
    from deepstrf.stream import StreamingNeuralDataset

    pool, open_s = timed(lambda: deepstrf.open_dataset(url, storage_options=storage_options))
    n_items, len_s = timed(lambda: len(pool))
    picked, select_s = timed(lambda: pool.select_pop_by_nrn_attr("area", "MLd"))
    out = {"S": pool.get_S(), "N": pool.N_neurons, "items": n_items, "open_s": open_s, "len_s": len_s,
           "select_s": select_s, "selected": len(picked)}
    ds, out["stream_open_s"] = timed(lambda: StreamingNeuralDataset(url, storage_options=storage_options,
                                                                     batch_size=8, seed=0))
    if not stream:
        return out
    loader, out["loader_s"] = timed(lambda: ds.loader(num_workers=2, timeout=600, persistent_workers=True))
    t0 = time.perf_counter()
    items, batches, peak_pss, warm = 0, 0, 0.0, None
    while items < warm_items + epoch_items:  # epochs follow one another (small pools have fewer items)
        for batch in loader:
            batches += 1
            if batches == 1:
                out["first_batch_s"] = round(time.perf_counter() - t0, 3)
                t1 = time.perf_counter()
                warm = None if warm_items else (0, t1)
                continue
            items += len(batch.stim_meta)
            if warm is None and items >= warm_items:
                warm = (items, time.perf_counter())
            if batches % 50 == 2:
                peak_pss = max(peak_pss, pss_mib())
            if items >= warm_items + epoch_items:
                break
        out.setdefault("lead_batches_first_pass", loader.lead_batches)
    if warm_items:
        out["warm_items_per_s"] = round(warm[0] / (warm[1] - t1), 1)
    out["items_per_s"] = round((items - warm[0]) / (time.perf_counter() - warm[1]), 1)
    out["items_read"] = items
    out["peak_pss_with_workers_mib"] = round(peak_pss)
    return out


def write(k: int, args: argparse.Namespace) -> dict:
    """Open ``k`` sources and write their pool (run in a fresh process)."""
    import deepstrf
    from deepstrf.forksafe import thread_map
    from deepstrf.store.atomic import stored_bytes
    from deepstrf.store.location import Location

    urls = make_sources(os.path.join(args.cache, "sources"), k)[:k]
    pool_url = os.path.join(args.cache, f"pool-{k}.zarr")
    opened, open_sources_s = timed(lambda: thread_map(deepstrf.open_dataset, urls, max_workers=8, name="bench"))
    _, write_s = timed(lambda: deepstrf.concat_neural_datasets(opened, store=pool_url, overwrite=True))
    out = {"K": k, "sources_open_s": open_sources_s, "pool_write_s": write_s,
           "pool_bytes": stored_bytes(Location.parse(pool_url)), "sources_bytes": stored_bytes(Location.parse(urls[0])) * k,
           "write_peak_rss_mib": round(peak_rss_mib())}
    out["pool_fraction_of_sources"] = round(out["pool_bytes"] / out["sources_bytes"], 6)
    return out


def read(k: int, args: argparse.Namespace) -> dict:
    """Open, select and stream the pool of ``k`` sources, locally and over S3 (a fresh process)."""
    pool_url = os.path.join(args.cache, f"pool-{k}.zarr")
    out = {"local": measure_reads(pool_url, None, args.epoch_items, stream=True, warm_items=args.warm_items)}
    out["read_peak_rss_mib"] = round(peak_rss_mib())
    if args.s3:
        urls = [source_url(os.path.join(args.cache, "sources"), i) for i in range(k)]
        out["s3"] = measure_s3(k, pool_url, urls, args)
    return out


def measure_s3(k: int, pool_url: str, urls: list[str], args: argparse.Namespace) -> dict:
    import s3fs

    from deepstrf.testing.s3 import LocalS3

    with LocalS3() as s3:
        s3.make_bucket("bench")
        fs = s3fs.S3FileSystem(**s3.storage_options())
        with_sources = k <= args.s3_sources_max
        fs.put(pool_url.rstrip("/") + "/", "bench/pool.zarr/", recursive=True)
        if with_sources:
            for u in urls:
                fs.put(u.rstrip("/") + "/", f"bench/sources/{os.path.basename(u)}/", recursive=True)
        s3.set_latency(0.020)
        out = measure_reads("s3://bench/pool.zarr", s3.storage_options(), args.s3_epoch_items, stream=with_sources)
        out["sources_uploaded"] = with_sources
        return out


def plot(lines_path: str, out: str) -> None:
    """Log-log figure of the JSON lines in ``lines_path`` (one per K): times against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(lines_path) if x.startswith("{")]
    ks = [r["K"] for r in rows]
    series = {"pool write (opened sources)": [r["pool_write_s"] for r in rows],
              "open the K sources (to pool them)": [r["sources_open_s"] for r in rows],
              "pool open, local": [r["local"]["open_s"] for r in rows],
              "pool open, S3 20 ms": [r["s3"]["open_s"] for r in rows if "s3" in r],
              "len + selection by neuron attribute": [r["local"]["len_s"] + r["local"]["select_s"] for r in rows],
              "StreamingNeuralDataset open": [r["local"]["stream_open_s"] for r in rows]}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, ys in series.items():
        ax.loglog(ks[:len(ys)], ys, marker="o", label=label)
    ax.set_xlabel("sources K (10 stims x 20 neurons each)")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--epoch-items", type=int, default=4000, help="items timed for items/s (after the warm-up)")
    p.add_argument("--warm-items", type=int, default=3000,
                   help="items read after the first batch before items/s is timed (the workers start meanwhile)")
    p.add_argument("--s3-epoch-items", type=int, default=400)
    p.add_argument("--s3-sources-max", type=int, default=100, help="upload the sources too up to this K")
    p.add_argument("--no-s3", dest="s3", action="store_false")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "deepstrf-bench-scale"))
    p.add_argument("--plot", nargs=2, metavar=("LINES", "PNG"), help="draw the figure of saved output lines")
    p.add_argument("--phase", choices=("write", "read"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    if args.phase is not None:
        print(json.dumps((write if args.phase == "write" else read)(args.k, args)), flush=True)
        return
    for k in args.ks:  # fresh processes per K and phase: peak RSS and caches are that phase's own
        line: dict = {}
        for phase in ("write", "read"):
            cmd = [sys.executable, __file__, "--phase", phase, "--k", str(k), "--epoch-items", str(args.epoch_items),
                   "--warm-items", str(args.warm_items),
                   "--s3-epoch-items", str(args.s3_epoch_items), "--s3-sources-max", str(args.s3_sources_max),
                   "--cache", args.cache] + ([] if args.s3 else ["--no-s3"])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            line.update(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
