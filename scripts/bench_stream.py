#!/usr/bin/env python
"""Streaming benchmark on the AA1+AA2-sized synthetic pool; prints ONE JSON line.

    python scripts/bench_stream.py [--scale 1] [--time-scale 1] [--workdir DIR]

Configurations, each run in a fresh child process. Throughput comes from
unsampled runs; peak memory (the summed PSS of the child and its DataLoader
workers, sampled every 50 ms) from one more, sampled run of each, since the
sampling itself slows the measured processes by 10-15 %:

- ``memory``: the pool loaded in RAM (``to_memory()``), ``DataLoader(batch_size=8,
  shuffle=True, collate_fn=neural_collate)``: what a deepSTRF user does today;
- ``local_w0_compact`` / ``local_w2_compact`` / ``local_w2_dense``: the pool
  streamed from local Zarr by ``StreamingNeuralDataset.loader()``, 0 or 2 workers
  (started by its default rule: forked here, since they run only deepstrf's code);
  ``local_w2_compact_forkserver``: the same with forkserver workers (what a dataset
  object, or a thread of the user's, gets); ``local_w2_compact_new_workers``: with
  ``persistent_workers=False``. With workers, ``later_epochs_*`` time two more epochs
  with the same loader (whose workers ``loader()`` keeps by default; new ones each epoch
  in ``local_w2_compact_new_workers``);
- ``local_w2_items_compact`` / ``local_w2_items_dense``: the dataset yields items
  (``batch_size=None``, ``loader_batch_size=8``) and a plain ``DataLoader(batch_size=8,
  collate_fn=compact_collate or neural_collate, num_workers=2)`` (forkserver workers) batches
  them: PyTorch's usual pattern (dense: ``prefetch_factor=1``, as ``loader()`` sets for dense
  batches, so that both dense configurations keep the same number of batches in flight);
- ``s3_w0_compact`` / ``s3_w2_compact``: the same stores on a local S3 (moto,
  served by this process) with ``--latency-ms`` added to every request (with
  workers, later epochs too, by workers kept across epochs: ``loader()``'s default
  over a network);
- ``mds_w2``: mosaicml-streaming reading the same items from uncompressed
  MDS shards on local disk (run with ``--mds-python``, a venv that has it);
- ``read_limit``: read and decompress every chunk of the pool once (deepstrf's reader, whole
  shards; zarr's own figure alongside).

Every epoch is batch 8, shuffled, and the consumer only counts items. With
``--repeat N`` every configuration runs N times, interleaved, and the run with
the median items/s is reported (``runs`` lists them all). ``first_epoch_cpu_s``
is the user and system CPU time of a streaming configuration's first epoch, in
the child and its workers together (on Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH = 8
# Configurations with DataLoader workers also time this many more epochs with the same loader:
# a forkserver's start-up (its ``import torch``) is paid once per process, in the first epoch.
LATER_EPOCHS = 2


# -- children: one configuration each ------------------------------------------------
def _timed_epoch(batches, count) -> dict:
    """Iterate ``batches`` once: time to first batch, items/s over the whole epoch and after
    the first batch (``steady_items_per_s``: without the start-up of workers and stores)."""
    start = time.perf_counter()
    first, first_items, items = None, 0, 0
    for batch in batches:
        items += count(batch)
        if first is None:
            first, first_items = time.perf_counter() - start, items
    total = time.perf_counter() - start
    return {"items": items, "seconds": round(total, 3), "items_per_s": round(items / total, 2),
            "first_batch_s": round(first, 3),
            "steady_items_per_s": round((items - first_items) / max(total - first, 1e-9), 2)}


def tree_cpu_s() -> tuple[float, float] | None:
    """User and system CPU seconds so far of this process, the children it reaped and its live
    descendants (DataLoader workers, a worker server and what it reaped); None without /proc."""
    if not os.path.exists("/proc/self/stat"):
        return None
    me, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = me.ru_utime + reaped.ru_utime, me.ru_stime + reaped.ru_stime
    parent_of, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile: reaped (counted above) or not ours
            continue
        parent_of[int(entry)] = int(fields[1])
        ticks[int(entry)] = (int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14]))
    tree = {os.getpid()}
    while more := {pid for pid, parent in parent_of.items() if parent in tree} - tree:
        tree |= more
    hz = os.sysconf("SC_CLK_TCK")
    for pid in tree - {os.getpid()}:
        user += ticks[pid][0] / hz
        system += ticks[pid][1] / hz
    return user, system


def child_memory(args) -> dict:
    from torch.utils.data import DataLoader

    from deepstrf import open_dataset
    from deepstrf.utils.data import neural_collate

    t = time.perf_counter()
    ds = open_dataset(args.pool).to_memory()
    load = time.perf_counter() - t
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=neural_collate)
    return {**_timed_epoch(loader, lambda b: len(b["stim_meta"])), "load_s": round(load, 2)}


def child_stream(args) -> dict:
    from torch.utils.data import DataLoader

    from deepstrf.stream import StreamingNeuralDataset
    from deepstrf.stream.workers import worker_context
    from deepstrf.utils.data import compact_collate, neural_collate

    options = json.loads(args.storage_options) if args.storage_options else None
    start = time.perf_counter()
    batching = {"loader_batch_size": BATCH} if args.itemwise else {"batch_size": BATCH, "collate": args.collate}
    ds = StreamingNeuralDataset(args.pool, storage_options=options, shuffle=True, seed=0, **batching)
    opened = time.perf_counter() - start  # the URL is opened (with its sources' index) at construction
    if args.itemwise:  # items batched by a plain DataLoader, as PyTorch users write it
        loader = DataLoader(ds, batch_size=BATCH, num_workers=args.workers,
                            collate_fn=compact_collate if args.collate == "compact" else neural_collate,
                            multiprocessing_context=worker_context() if args.workers else None,
                            prefetch_factor=1 if args.collate == "dense" and args.workers else None)
    else:
        lifetime = {"persistent_workers": False} if args.new_workers else {}  # else loader()'s default: kept
        loader = ds.loader(num_workers=args.workers, **lifetime,
                           multiprocessing_context=None if args.start_method == "default" else args.start_method)
    cpu_before = tree_cpu_s()
    out = _timed_epoch(loader, lambda b: len(b["stim_meta"]))
    if cpu_before is not None:  # the first epoch's CPU time, the workers' included
        cpu_after = tree_cpu_s()
        out["first_epoch_cpu_s"] = [round(cpu_after[0] - cpu_before[0], 2), round(cpu_after[1] - cpu_before[1], 2)]
    stats = ds.stats()
    if args.later_epochs:  # the same loader again: what every epoch after a process's first costs
        later = []
        for epoch in range(1, args.later_epochs + 1):
            ds.set_epoch(epoch)  # a plain DataLoader does not advance the epoch (loader() does)
            later.append(_timed_epoch(loader, lambda b: len(b["stim_meta"])))
        out["later_epochs_items_per_s"] = [e["items_per_s"] for e in later]
        out["later_epochs_first_batch_s"] = [e["first_batch_s"] for e in later]
    return {**out, "open_s": round(opened, 3), **{k: stats[k] for k in ("requests", "bytes_fetched", "bytes_used")}}


def read_every_chunk(sources: list[str], names: tuple[str, ...], by_zarr: bool = False,
                     shards_per_read: int = 2) -> int:
    """Decode arrays ``names`` of every source once, in runs of ``shards_per_read`` whole shards
    (of 32 chunks where unsharded): through deepstrf's reader, or zarr's ``Array.__getitem__``
    (``by_zarr``). Returns the bytes decoded."""
    import zarr

    from deepstrf import open_dataset

    nbytes = 0
    for url in sources:
        reader = open_dataset(url).responses.reader
        group = zarr.open_group(url, mode="r")
        for name in names:
            arr = group[name]
            step = (arr.shards or arr.chunks)[0] * (shards_per_read if arr.shards else 32)
            for lo in range(0, arr.shape[0], step):
                sel = slice(lo, min(lo + step, arr.shape[0]))
                nbytes += (arr[sel] if by_zarr else reader.gather([(name, sel)])[0]).nbytes
    return nbytes


def child_read_limit(args) -> dict:
    """Read + decompress every chunk of every source's responses and stimuli once, no per-item work.

    Through deepstrf's reader in runs of whole shards (its fastest path, the one streaming uses:
    one range GET per shard, inner chunks decoded straight into the output) and, for
    reference, through zarr's ``Array.__getitem__`` in the same runs (``zarr_*`` keys).
    """
    from deepstrf import open_dataset
    from deepstrf.store import format as fmt

    n_items = len(open_dataset(args.pool))
    timings = {}
    for how in ("zarr", "deepstrf", "zarr", "deepstrf"):  # each twice, the second (warm) run counts
        start = time.perf_counter()
        nbytes = read_every_chunk(args.sources, (fmt.VALUES, fmt.STIM_VALUES), by_zarr=how == "zarr")
        timings[how] = (time.perf_counter() - start, nbytes)
    total, nbytes = timings["deepstrf"]
    return {"items": n_items, "seconds": round(total, 3), "items_per_s": round(n_items / total, 2),
            "bytes_decoded": nbytes, "zarr_seconds": round(timings["zarr"][0], 3),
            "zarr_items_per_s": round(n_items / timings["zarr"][0], 2)}


MDS_CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from streaming import MDSWriter, StreamingDataset
from torch.utils.data import DataLoader

stage, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
columns = {"stims": "ndarray", "values": "ndarray", "neurons": "ndarray", "repeats": "ndarray",
           "lengths": "ndarray", "uid": "str"}

def collate(samples):  # the same compact layout the streaming side builds
    T = max(s["stims"].shape[-1] for s in samples)
    stims = torch.zeros((len(samples),) + samples[0]["stims"].shape[:-1] + (T,))
    for i, s in enumerate(samples):
        stims[i, ..., :s["stims"].shape[-1]] = torch.from_numpy(s["stims"])
    return {"stims": stims, "values": torch.from_numpy(np.concatenate([s["values"] for s in samples])),
            "neuron_index": torch.from_numpy(np.concatenate([s["neurons"] for s in samples])),
            "stim_meta": [s["uid"] for s in samples]}

if __name__ == "__main__":
    if sys.argv[4] == "write":
        with MDSWriter(out=out, columns=columns, compression=None, size_limit=1 << 26) as w:
            for path in sorted(Path(stage).glob("*.npz")):
                z = np.load(path)
                w.write({"stims": z["stims"], "values": z["values"], "neurons": z["neurons"],
                         "repeats": z["repeats"], "lengths": z["lengths"], "uid": str(z["uid"])})
        sys.exit(0)
    ds = StreamingDataset(local=out, batch_size=batch, shuffle=True, shuffle_seed=0)
    loader = DataLoader(ds, batch_size=batch, num_workers=int(sys.argv[5]), collate_fn=collate)
    start = time.perf_counter(); first = None; items = 0
    for b in loader:
        items += len(b["stim_meta"])
        if first is None:
            first, first_items = time.perf_counter() - start, items
    total = time.perf_counter() - start
    print(json.dumps({"items": items, "seconds": round(total, 3), "items_per_s": round(items / total, 2),
                      "first_batch_s": round(first, 3),
                      "steady_items_per_s": round((items - first_items) / max(total - first, 1e-9), 2)}))
"""

CHILDREN = {"memory": child_memory, "stream": child_stream, "read_limit": child_read_limit}
# what --only and --skip name (the module doc says what each measures)
CONFIGURATIONS = ("read_limit", "memory", "local_w0_compact", "local_w2_compact", "local_w2_dense",
                  "local_w2_items_compact", "local_w2_items_dense", "local_w2_compact_forkserver",
                  "local_w2_compact_new_workers", "s3_w0_compact", "s3_w2_compact", "mds_w2")


# -- parent: build the data, run the children, sample their memory ------------------------
def _pss_tree(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_child(cmd: list[str], sample_memory: bool = False) -> dict:
    """Run ``cmd``; its last stdout line is a JSON dict. With ``sample_memory``, the peak summed
    PSS of the child and its workers is added (sampled every 50 ms: reading every process's
    page tables costs the measured processes 10-15 % of their speed, so timed runs are not
    sampled)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_tree(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    out, err = proc.communicate()
    if sample_memory:
        sampler.join()
    if proc.returncode != 0:
        return {"error": (err or out).strip().splitlines()[-1][:300] if (err or out).strip() else "failed"}
    result = json.loads(out.strip().splitlines()[-1])
    if sample_memory:
        result["peak_pss_mib"] = round(peak[0] / 2**20, 1)
    return result


def build_stores(workdir: Path, scale: float, time_scale: float) -> tuple[str, list[str], float]:
    """AA1- and AA2-shaped synthetic sources saved as local Zarr, and their pool (reused if present)."""
    from deepstrf import concat_neural_datasets, open_dataset, save_dataset
    from deepstrf.datasets.synthetic import SyntheticAudioDataset

    from deepstrf.store import format as fmt

    layout = (f"v{fmt.FORMAT_VERSION}-c{fmt.CHUNK_BYTES}-{fmt.STIM_CHUNK_BYTES}-{fmt.SHARD_CHUNKS}"
              f"-ts{fmt.BITSHUFFLE_MIN_TYPESIZE}")
    root = workdir / f"stores-{layout}-s{scale}-t{time_scale}"  # a new format or layout is written afresh
    pool = root / "pool"
    sources = [str(root / "aa1"), str(root / "aa2")]
    start = time.perf_counter()
    if not pool.exists():
        for preset, url, seed in (("aa1", sources[0], 1), ("aa2", sources[1], 2)):
            if not Path(url).exists():
                save_dataset(SyntheticAudioDataset(preset, scale=scale, time_scale=time_scale, seed=seed), url,
                             progress=False)
        concat_neural_datasets([open_dataset(u) for u in sources], names=["AA1", "AA2"], store=str(pool))
    return str(pool), sources, time.perf_counter() - start


def stage_for_mds(pool: str, stage: Path) -> None:
    """Export every visible item of the pool (compact cells + stimulus) as .npz for the MDS writer."""
    import numpy as np

    from deepstrf import open_dataset
    from deepstrf.datasets import views

    if stage.exists() and any(stage.iterdir()):
        return
    stage.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(pool)
    for i, s in enumerate(ds.visible_stims()):
        (row,) = views.read_raw_rows(ds.responses, [s])
        np.savez(stage / f"{i:06d}.npz", stims=ds.stims[s].numpy(), values=row.values, neurons=row.neurons,
                 repeats=row.repeats, lengths=row.lengths, uid=ds.stim_meta[s]["uid"])


def upload_to_s3(local_root: Path, latency_s: float):
    """Start a local S3 (moto) server, upload the stores, then add ``latency_s`` per request."""
    import s3fs

    from deepstrf.testing.s3 import LocalS3

    server = LocalS3().start()
    root = server.make_bucket("bench")
    options = server.storage_options()
    s3fs.S3FileSystem(**options).put(str(local_root), "bench/stores", recursive=True)
    server.set_latency(latency_s)
    return server, f"{root}/stores/pool", options


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="factor on S and N of the AA1/AA2 presets")
    p.add_argument("--time-scale", type=float, default=1.0, help="factor on T")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "deepstrf-bench-stream"))
    p.add_argument("--latency-ms", type=float, default=20.0, help="added latency per S3 request")
    p.add_argument("--mds-python", default="/work/mdsvenv/bin/python",
                   help="python of a venv with mosaicml-streaming (skipped if absent)")
    p.add_argument("--skip", action="append", default=[], help="configuration to skip (repeatable)")
    p.add_argument("--only", action="append", default=[],
                   help="run only this configuration (repeatable; e.g. --only s3_w0_compact --only s3_w2_compact)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of every configuration, interleaved; the median run is reported")
    # internal: run one configuration in this process
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--pool", help=argparse.SUPPRESS)
    p.add_argument("--sources", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--collate", default="compact", help=argparse.SUPPRESS)
    p.add_argument("--storage-options", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-method", default="default", help=argparse.SUPPRESS)
    p.add_argument("--later-epochs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--itemwise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--new-workers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if unknown := sorted(set(args.only) - set(CONFIGURATIONS)):
        p.error(f"--only {', '.join(unknown)}: no such configuration; they are {', '.join(CONFIGURATIONS)}")
    if args.child:
        result = CHILDREN[args.child](args)
        print(json.dumps(result))
        return result

    import warnings

    warnings.filterwarnings("ignore")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pool, sources, build_s = build_stores(workdir, args.scale, args.time_scale)
    me = [sys.executable, os.path.abspath(__file__), "--pool", pool]
    results: dict = {"bench": "stream", "scale": args.scale, "time_scale": args.time_scale, "batch_size": BATCH,
                     "cpus": os.cpu_count(), "build_s": round(build_s, 1)}

    def want(name: str) -> bool:
        """Whether to run configuration ``name``."""
        return name in args.only if args.only else name not in args.skip

    def want_group(group: str) -> bool:
        """Whether to set up the group ``group`` (``s3``: its server, ``mds``: its shards): skipped
        whole with ``--skip GROUP``, run where ``--only`` names one of its configurations."""
        return any(o.startswith(group + "_") for o in args.only) if args.only else want(group)

    configs: list[tuple[str, list[str]]] = []
    if want("read_limit"):
        configs.append(("read_limit", me + ["--child", "read_limit", "--sources", *sources]))
    if want("memory"):
        configs.append(("memory", me + ["--child", "memory"]))
    for workers, collate in ((0, "compact"), (2, "compact"), (2, "dense")):
        if want(name := f"local_w{workers}_{collate}"):
            configs.append((name, me + ["--child", "stream", "--workers", str(workers), "--collate", collate,
                                        "--later-epochs", str(LATER_EPOCHS if workers else 0)]))
    for collate in ("compact", "dense"):
        if want(name := f"local_w2_items_{collate}"):
            configs.append((name, me + ["--child", "stream", "--itemwise", "--workers", "2", "--collate", collate,
                                        "--later-epochs", str(LATER_EPOCHS)]))
    if want("local_w2_compact_forkserver"):  # the start method of workers that run the user's code
        configs.append(("local_w2_compact_forkserver", me + ["--child", "stream", "--workers", "2", "--start-method",
                                                             "forkserver", "--later-epochs", str(LATER_EPOCHS)]))
    if want("local_w2_compact_new_workers"):
        configs.append(("local_w2_compact_new_workers", me + ["--child", "stream", "--workers", "2", "--new-workers",
                                                             "--later-epochs", str(LATER_EPOCHS)]))
    server = None
    if want_group("s3"):
        server, s3_pool, options = upload_to_s3(Path(pool).parent, args.latency_ms / 1000)
        results["s3_latency_ms"] = args.latency_ms
        for workers in (0, 2):
            if want(name := f"s3_w{workers}_compact"):
                configs.append((name, [sys.executable, os.path.abspath(__file__), "--pool", s3_pool, "--child",
                                       "stream", "--workers", str(workers), "--storage-options", json.dumps(options),
                                       "--later-epochs", str(LATER_EPOCHS if workers else 0)]))
    if want_group("mds") and os.path.exists(args.mds_python):
        stage = workdir / f"mds-stage-s{args.scale}-t{args.time_scale}"
        shards = workdir / f"mds-s{args.scale}-t{args.time_scale}"
        stage_for_mds(pool, stage)
        script = workdir / "mds_child.py"
        script.write_text(MDS_CHILD)
        if not (shards / "index.json").exists():
            subprocess.run([args.mds_python, str(script), str(stage), str(shards), str(BATCH), "write"], check=True,
                           capture_output=True)
        configs.append(("mds_w2", [args.mds_python, str(script), str(stage), str(shards), str(BATCH), "read", "2"]))
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    peaks: dict[str, dict] = {}
    try:
        for _ in range(args.repeat):  # interleaved, so load changes on the machine hit every configuration
            for name, cmd in configs:
                runs[name].append(run_child(cmd))
        for name, cmd in configs:  # memory: one more run of each, sampled
            peaks[name] = run_child(cmd, sample_memory=True)
    finally:
        if server is not None:
            server.stop()
    for name, done in runs.items():
        results[name] = median_run(done)
        if "peak_pss_mib" in peaks[name]:
            results[name]["peak_pss_mib"] = peaks[name]["peak_pss_mib"]
            results[name]["sampled_run_items_per_s"] = peaks[name].get("items_per_s")
    results["goals"] = goals(results)
    print(json.dumps(results))
    return results


def median_run(done: list[dict]) -> dict:
    """The run with the median items/s, plus every run's items/s (``runs``) when there were several."""
    ok = sorted((r for r in done if "items_per_s" in r), key=lambda r: r["items_per_s"])
    if not ok:
        return done[-1]
    best = dict(ok[(len(ok) - 1) // 2])
    if len(done) > 1:
        best["runs"] = [r.get("items_per_s") for r in done]
    return best


def goals(r: dict) -> dict:
    """The issue's targets, as measured ratios and pass/fail."""
    def rate(name: str) -> float | None:
        return r.get(name, {}).get("items_per_s")

    out: dict = {}
    b, a, e = rate("local_w2_compact"), rate("memory"), rate("read_limit")
    if b and a:
        out["stream_vs_memory"] = round(b / a, 2)
        out["stream_2x_memory"] = b >= 2 * a
    if b and e:
        out["stream_vs_read_limit"] = round(b / e, 2)
        out["stream_70pct_read_limit"] = b >= 0.7 * e
    if b and "local_w2_compact" in r:
        out["stream_peak_le_1gib"] = r["local_w2_compact"]["peak_pss_mib"] <= 1024
    later = r.get("local_w2_compact", {}).get("later_epochs_items_per_s")
    if later and e:  # after the process's first epoch (the forkserver's start-up)
        out["later_epochs_vs_read_limit"] = round(statistics.median(later) / e, 2)
        out["later_epochs_70pct_read_limit"] = statistics.median(later) >= 0.7 * e
    if b and rate("s3_w2_compact"):
        out["s3_vs_local"] = round(rate("s3_w2_compact") / b, 2)
        out["s3_70pct_local"] = rate("s3_w2_compact") >= 0.7 * b
    if b and rate("mds_w2"):
        out["stream_vs_mds"] = round(b / rate("mds_w2"), 2)
        out["stream_ge_mds"] = b >= rate("mds_w2")
    dense = rate("local_w2_dense")
    if dense and a:
        out["dense_vs_memory"] = round(dense / a, 2)
        out["dense_3x_memory"] = dense >= 3 * a
    for name, built in (("local_w2_items_compact", b), ("local_w2_items_dense", dense)):
        if rate(name) and built:
            fmt = name.rsplit("_", 1)[1]
            out[f"items_{fmt}_vs_batches"] = round(rate(name) / built, 2)
            out[f"items_{fmt}_70pct_batches"] = rate(name) >= 0.7 * built
    def later(name: str) -> float | None:  # median of the epochs after a loader's first (worker start-up paid)
        epochs = r.get(name, {}).get("later_epochs_items_per_s")
        return statistics.median(epochs) if epochs else None

    if later("local_w2_dense") and a:
        out["dense_later_epochs_vs_memory"] = round(later("local_w2_dense") / a, 2)
    for fmt, built in (("compact", later("local_w2_compact")), ("dense", later("local_w2_dense"))):
        if later(f"local_w2_items_{fmt}") and built:
            out[f"items_{fmt}_later_epochs_vs_batches"] = round(later(f"local_w2_items_{fmt}") / built, 2)
    for name in ("local_w2_dense", "local_w2_items_compact", "local_w2_items_dense"):
        if "peak_pss_mib" in r.get(name, {}):
            out[f"{name}_peak_le_1gib"] = r[name]["peak_pss_mib"] <= 1024
    for where in ("local", "s3"):  # workers never lose to no workers, first epoch included
        w0, w2 = rate(f"{where}_w0_compact"), rate(f"{where}_w2_compact")
        if w0 and w2:
            out[f"{where}_first_epoch_w2_vs_w0"] = round(w2 / w0, 2)
            out[f"{where}_first_epoch_w2_ge_w0"] = w2 >= w0
            rounds = zip(r[f"{where}_w0_compact"].get("runs", []), r[f"{where}_w2_compact"].get("runs", []))
            ratios = [round(b / a, 2) for a, b in rounds if a and b]
            if len(ratios) > 1:  # the two run one after the other in each round: paired, less noisy
                out[f"{where}_first_epoch_w2_vs_w0_by_round"] = ratios
    if later("s3_w2_compact") and later("local_w2_compact"):
        out["s3_later_epochs_vs_local"] = round(later("s3_w2_compact") / later("local_w2_compact"), 2)
        out["s3_later_epochs_80pct_local"] = later("s3_w2_compact") >= 0.8 * later("local_w2_compact")
    for name in ("local_w2_compact", "local_w2_compact_new_workers", "s3_w2_compact"):
        if "peak_pss_mib" in r.get(name, {}):
            out[f"{name}_3_epochs_peak_le_1gib"] = r[name]["peak_pss_mib"] <= 1024
    firsts = [r[k]["first_batch_s"] for k in ("local_w0_compact", "local_w2_compact") if "first_batch_s" in r.get(k, {})]
    if firsts:
        out["first_batch_le_1s_local"] = max(firsts) <= 1.0
    return out


if __name__ == "__main__":
    main()
