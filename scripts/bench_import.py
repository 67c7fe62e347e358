"""Benchmark ``deepstrf import-nwb`` on one Neuropixels-sized session, or on many small sessions with
the two batch engines side by side; prints one JSON line.

    python scripts/bench_import.py [--units 300] [--hours 2] [--presentations 5000] [--stims 100]
                                   [--latency-ms 20] [--extra-mb 256] [--no-s3] [--zarr]
    python scripts/bench_import.py --sessions 40 [--workers 2]

With ``--sessions N``: N small sessions (``--small-units`` units, 20 stims x 5 repeats of 0.5 s)
imported twice, each run in a fresh process: with ``--jobs W`` (local worker processes) and with
``--dask local:W`` (a Dask LocalCluster of W worker processes), wall time including starting the
engine. ``peak_worker_rss_mib``: the largest peak RSS (``VmHWM``) among the processes the engine
started, sampled every 0.1 s.

Writes one NWB file with pynwb (``deepstrf.testing.nwb``): ``--units`` units firing at
``--rate-hz``, ``--presentations`` presentations of ``--stims`` sound waveforms (16 kHz) over
``--hours``, and a ``--extra-mb`` acquisition series standing in for the LFP / raw data such files
carry (the import never reads it). Then imports it into a local source store (``import_sessions``,
``--dt-ms`` bins, 32 mel bands) twice, each in a fresh process so that its peak RSS is its own:
from the local file, and from a moto S3 server in this process with ``--latency-ms`` added to every
request (bytes fetched = body bytes the server sent). ``cpu_s`` is the importing process's CPU time
(all its threads): on a shared machine it varies less than the wall time. ``--zarr`` also writes the
session's NWB-Zarr twin (``deepstrf.testing.nwbzarr``) and imports it from the local folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings


def measure(args) -> dict:
    """Child process: import ``args.source`` and report wall time and peak RSS."""
    from deepstrf.io import import_sessions

    so = json.loads(args.storage_options) if args.storage_options else None
    t0, c0 = time.perf_counter(), time.process_time()
    [r] = import_sessions(args.out, [args.source], dt_ms=args.dt_ms, storage_options=so, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if r.status != "imported":
        raise SystemExit(f"import {r.status}: {r.error}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": peak_rss_mib(), "n_stims": r.n_stims, "n_neurons": r.n_neurons}


def measure_batch(args) -> dict:
    """Child process: import the sessions listed in ``args.source`` with one engine."""
    import contextlib

    from deepstrf.engine import dask_client
    from deepstrf.io import import_sessions
    from deepstrf.store.listing import read_listing

    sources = read_listing(args.source)
    sampler = TreePeakRSS()
    sampler.start()
    t0 = time.perf_counter()
    with dask_client(f"local:{args.workers}") if args.engine == "dask" else contextlib.nullcontext() as client:
        results = import_sessions(args.out, sources, dt_ms=args.dt_ms, client=client,
                                  jobs=args.workers if args.engine == "jobs" else 1, progress=False)
        sampler.sample()
    wall = time.perf_counter() - t0
    sampler.stop()
    failed = [r.error for r in results if r.status != "imported"]
    if failed:
        raise SystemExit(f"{len(failed)} imports failed: {failed[:3]}")
    return {"wall_s": round(wall, 2), "peak_worker_rss_mib": max(sampler.peaks.values(), default=0),
            "sessions_per_s": round(len(sources) / wall, 2)}


class TreePeakRSS:
    """Peak RSS (``VmHWM``) of every process below this one, sampled by a thread every 0.1 s."""

    def __init__(self) -> None:
        import threading

        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
            self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), round(kib / 1024))


def run_batches(args) -> dict:
    """``--sessions N``: the same N small sessions imported by each engine, each in a fresh process."""
    from deepstrf.testing.nwb import SessionSpec, write_session

    out: dict = {"sessions": args.sessions, "workers": args.workers, "units": args.small_units, "stims": 20,
                 "repeats": 5, "dt_ms": args.dt_ms}
    with tempfile.TemporaryDirectory(prefix="bench-import-batch-") as tmp:
        t0 = time.perf_counter()
        paths = [os.path.join(tmp, f"session{k:04d}.nwb") for k in range(args.sessions)]
        for k, path in enumerate(paths):
            write_session(path, SessionSpec(session_id=f"bench-{k}", n_units=args.small_units, n_stims=20,
                                            repeats=5, seed=k))
        out["generate_s"] = round(time.perf_counter() - t0, 1)
        listing = os.path.join(tmp, "sessions.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        for engine in ("jobs", "dask"):
            cmd = [sys.executable, os.path.abspath(__file__), "--measure-batch", "--engine", engine, "--source",
                   listing, "--out", os.path.join(tmp, engine), "--workers", str(args.workers),
                   "--dt-ms", str(args.dt_ms)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
            out[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["dask_over_jobs_wall"] = round(out["dask"]["wall_s"] / out["jobs"]["wall_s"], 3)
    return out


def peak_rss_mib() -> int:
    """This process's peak RSS: ``VmHWM`` (getrusage's ``ru_maxrss`` would count the parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
    except OSError:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_child(args, source: str, out: str, storage_options: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", "--source", source, "--out", out,
           "--dt-ms", str(args.dt_ms)]
    if storage_options:
        cmd += ["--storage-options", json.dumps(storage_options)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=300)
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--presentations", type=int, default=5000)
    p.add_argument("--stims", type=int, default=100)
    p.add_argument("--rate-hz", type=float, default=8.0, help="mean firing rate of the units")
    p.add_argument("--dt-ms", type=float, default=5.0)
    p.add_argument("--latency-ms", type=float, default=20.0, help="latency added to every S3 request")
    p.add_argument("--extra-mb", type=int, default=256, help="size of the acquisition series nobody reads")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--zarr", action="store_true", help="also import the session's NWB-Zarr twin (local)")
    p.add_argument("--sessions", type=int, default=0, help="import this many small sessions with both engines")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each engine (--sessions)")
    p.add_argument("--small-units", type=int, default=30, help="units per small session (--sessions)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-batch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=["jobs", "dask"], help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--storage-options", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if args.measure_batch:
        print(json.dumps(measure_batch(args)))
        return 0
    if args.sessions:
        print(json.dumps(run_batches(args)))
        return 0

    import numpy as np

    from deepstrf.testing.nwb import SessionSpec, write_session

    period = args.hours * 3600 / args.presentations
    spec = SessionSpec(session_id="bench-np", n_units=args.units, n_stims=args.stims,
                       repeats=args.presentations // args.stims, stim_s=round(period * 0.7, 3),
                       gap_s=round(period * 0.3, 3), audio_fs=16000.0, partial_units=args.units // 10,
                       rate_hz=args.rate_hz, extra_bytes=args.extra_mb << 20)
    out: dict = {"units": args.units, "hours": args.hours, "presentations": spec.n_stims * spec.repeats,
                 "stims": args.stims, "dt_ms": args.dt_ms, "stim_s": spec.stim_s}
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        path = os.path.join(tmp, "session.nwb")
        t0 = time.perf_counter()
        truth = write_session(path, spec)
        out["generate_s"] = round(time.perf_counter() - t0, 1)
        out["spikes"] = int(sum(len(s) for s in truth.spikes))
        out["file_bytes"] = os.path.getsize(path)
        del truth
        local = run_child(args, path, os.path.join(tmp, "local"))
        out["local"] = {**local, "spikes_per_s": round(out["spikes"] / local["wall_s"])}
        store = os.path.join(tmp, "local", "session.zarr")
        out["store_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
        if args.zarr:
            from deepstrf.testing.nwbzarr import write_nwb_zarr

            twin = os.path.join(tmp, "session.nwb.zarr")
            write_nwb_zarr(path, twin)
            out["nwb_zarr"] = run_child(args, twin, os.path.join(tmp, "zarr"))
        if not args.no_s3:
            from deepstrf.testing.s3 import LocalS3

            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.setdefault(key, "testing")
            with LocalS3() as sim:
                import s3fs

                url = sim.make_bucket("bench") + "/session.nwb"
                s3fs.S3FileSystem(**sim.storage_options()).put(path, url)
                sim.set_latency(args.latency_ms / 1000)
                before, requests = sim.bytes_sent, sim.requests
                remote = run_child(args, url, os.path.join(tmp, "s3"), sim.storage_options())
                fetched = sim.bytes_sent - before
                out["s3"] = {**remote, "spikes_per_s": round(out["spikes"] / remote["wall_s"]),
                             "latency_ms": args.latency_ms, "requests": sim.requests - requests,
                             "bytes_fetched": fetched, "fetched_fraction": round(fetched / out["file_bytes"], 3)}
        out["rss_goal_met"] = all(out[k]["peak_rss_mib"] <= 1024 for k in ("local", "nwb_zarr", "s3") if k in out)
    print(json.dumps(out, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
