"""User story: convert a dandiset's NWB sessions on a SLURM cluster with Dask, then verify and pool them.

Each SLURM job runs one Dask worker process per core; each process imports one session at a time
(one task per session, ~1 GiB at Neuropixels scale, so give each process 1.5-2 GB). Run this on a
login node (the scheduler lives in this process; workers connect back to it):

    pip install 'deepstrf-pool[slurm]'
    python examples/cluster_slurm.py stores/ --from-list sessions.txt --jobs 20 --cores 8 \\
        --memory 16GB --queue normal --walltime 02:00:00

``sessions.txt`` holds one NWB file or URL per line (e.g. a dandiset's S3 listing). Sessions already
imported with the same inputs are skipped, so the command can be re-run after a failure or a
time-out. ``--tiny`` only builds the cluster object and prints the batch script it would submit.
The same import on one machine needs no cluster: ``deepstrf import-nwb stores/ --from-list
sessions.txt --dask local:8``.
"""

from __future__ import annotations

import argparse

from deepstrf.io import import_sessions


def make_cluster(*, queue: str | None, cores: int, memory: str, walltime: str, account: str | None = None):
    """A dask-jobqueue ``SLURMCluster``: jobs of ``cores`` single-threaded worker processes (nothing is
    submitted until it is scaled)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(queue=queue, account=account, cores=cores, processes=cores, memory=memory,
                        walltime=walltime, job_name="deepstrf-import")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="stores", help="where the source stores go")
    p.add_argument("--from-list", default=None, help="listing of NWB files or URLs, one per line")
    p.add_argument("--jobs", type=int, default=10, help="SLURM jobs to start (workers = jobs x cores)")
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--memory", default="16GB", help="memory per job")
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("--dt-ms", type=float, default=5.0)
    p.add_argument("--tiny", action="store_true", help="build the cluster and print its job script only")
    args = p.parse_args()

    with make_cluster(queue=args.queue, cores=args.cores, memory=args.memory, walltime=args.walltime,
                      account=args.account) as cluster:
        print(cluster.job_script())
        if args.tiny:
            return
        from distributed import Client

        from deepstrf.store.listing import gather_inputs

        sources = gather_inputs([], args.from_list)
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            results = import_sessions(args.out_dir, sources, dt_ms=args.dt_ms, client=client)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.source}: {r.error}")
    print(f"{len(results) - len(failed)} of {len(results)} sessions in {args.out_dir}; pool them with: "
          f"deepstrf concat pool.zarr '{args.out_dir}/*.zarr'")


if __name__ == "__main__":
    main()
