"""Batch work on a real Dask ``LocalCluster`` (two single-threaded worker processes): ``import-nwb
--dask`` against ``--jobs``, skipping on a re-run, failures reported, ``verify --dask``; inputs from
listings and glob patterns (local and S3)."""

from __future__ import annotations

import os

import pytest

from deepstrf import concat_neural_datasets, open_dataset
from deepstrf.cli import main
from deepstrf.store.listing import gather_inputs
from deepstrf.testing.nwb import SessionSpec, write_session

distributed = pytest.importorskip("distributed")

ARGS = ["--dt-ms", "10", "--bands", "16"]


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (1 thread each) and a client; closed after the module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        yield c, client


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Six small NWB sessions, the last one broken (truncated)."""
    root = tmp_path_factory.mktemp("cluster-nwb")
    paths = []
    for k in range(6):
        paths.append(str(root / f"sess{k}.nwb"))
        write_session(paths[-1], SessionSpec(session_id=f"s{k}", n_units=3, n_stims=2, repeats=2, seed=20 + k))
    with open(paths[-1], "r+b") as f:
        f.truncate(os.path.getsize(paths[-1]) // 3)
    return paths


def _lines(text: str, status: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(status)]


def test_import_on_dask_equals_jobs_skips_done_and_reports_the_broken_one(sessions, cluster, tmp_path, capsys):
    by_jobs, by_dask = str(tmp_path / "jobs"), str(tmp_path / "dask")
    assert main(["import-nwb", by_jobs, *sessions, *ARGS, "--jobs", "2"]) == 1
    capsys.readouterr()
    assert main(["import-nwb", by_dask, *sessions, *ARGS, "--dask", "local:2"]) == 1
    out, err = capsys.readouterr()
    assert len(_lines(out, "imported ")) == 5
    assert "sess5.nwb" in err and "error:" in err and "Traceback" not in err
    for k in range(5):
        a, b = open_dataset(f"{by_jobs}/sess{k}.zarr"), open_dataset(f"{by_dask}/sess{k}.zarr")
        assert a.fingerprint == b.fingerprint and a.card == b.card
        assert a.stim_meta == b.stim_meta and (a.responses[1][2] == b.responses[1][2]).all()
    assert not os.path.exists(f"{by_dask}/sess5.zarr")

    # the second run, on a running scheduler given by its address: the 5 are skipped, the broken one fails again
    assert main(["import-nwb", by_dask, *sessions, *ARGS, "--dask", cluster[0].scheduler_address]) == 1
    out, err = capsys.readouterr()
    assert len(_lines(out, "skipped ")) == 5 and not _lines(out, "imported ") and "sess5.nwb" in err


def test_verify_on_dask_finds_the_corrupted_chunk_of_one_source(sessions, cluster, tmp_path, capsys):
    from deepstrf.io import import_sessions

    results = import_sessions(tmp_path / "stores", sessions[:4], dt_ms=10.0, client=cluster[1], progress=False)
    assert [r.status for r in results] == ["imported"] * 4
    pool_url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([open_dataset(r.store) for r in results], store=pool_url)
    assert main(["verify", pool_url, "--dask", cluster[0].scheduler_address]) == 0
    assert "every source chunk checksummed" in capsys.readouterr().out

    [chunk] = [c for c in (tmp_path / "stores" / "sess2.zarr" / "responses" / "values").rglob("*")
               if c.is_file() and c.name != "zarr.json"]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["verify", pool_url, "--dask", cluster[0].scheduler_address]) == 1
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if "problem:" in line]
    assert problems and all("'sess2'" in p or "sess2.zarr" in p for p in problems), problems
    assert "Traceback" not in err


def test_inputs_from_a_listing_and_patterns(sessions, tmp_path, s3_server, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    prefix = s3_server.url("dandiset")
    fs.put(sessions[0], f"{prefix}/sub-01/sess0.nwb")
    fs.put(sessions[1], f"{prefix}/sub-02/ses-a/sess1.nwb")
    fs.pipe(f"{prefix}/sub-02/notes.txt", b"not a session")
    listing = tmp_path / "listing.txt"
    folder, name = os.path.split(sessions[2])  # the same file written two ways is kept once
    listing.write_text(f"# a dandiset's listing\n\n{prefix}/**/*.nwb\n  {sessions[2]}  \n{sessions[2]}\n"
                       f"{folder}/./{name}\n{folder}/../{os.path.basename(folder)}/{name}\n")
    so = s3_server.storage_options
    found = gather_inputs([os.path.join(os.path.dirname(sessions[0]), "sess[34].nwb")], str(listing), so)
    assert found == [sessions[3], sessions[4], f"{prefix}/sub-01/sess0.nwb", f"{prefix}/sub-02/ses-a/sess1.nwb",
                     sessions[2]]

    out = str(tmp_path / "imported")
    so_args = ["-S", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    assert main(["import-nwb", out, "--from-list", str(listing), *ARGS, *so_args]) == 0
    assert len(_lines(capsys.readouterr().out, "imported ")) == 3
    assert open_dataset(f"{out}/sess1.zarr").card["source"] == f"{prefix}/sub-02/ses-a/sess1.nwb"

    stores = tmp_path / "stores.txt"
    stores.write_text("# pooled sources\n" + "\n".join(f"{out}/sess{k}.zarr" for k in (0, 1, 2)) + "\n")
    pool_url = str(tmp_path / "pool.zarr")
    assert main(["concat", pool_url, "--from-list", str(stores)]) == 0
    assert "from 3 sources" in capsys.readouterr().out
    pool = open_dataset(pool_url)
    assert pool.N_neurons == 9 and [s["ref"] for s in pool.pool_sources] == [f"imported/sess{k}.zarr" for k in range(3)]


@pytest.mark.parametrize("argv, needle", [  # (--dask local:0 is a usage error: test_cli_errors)
    (["--from-list", "/nonexistent/listing.txt"], "no listing file"),
    (["/nonexistent/folder/*.nwb"], "no file matches"),
])
def test_refusals(tmp_path, capsys, argv, needle):
    assert main(["import-nwb", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_no_input_is_a_command_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["import-nwb", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and "name the NWB files to import: paths or URLs, patterns" in err


def test_dask_and_jobs_together_is_a_command_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["import-nwb", str(tmp_path / "out"), "x.nwb", "--dask", "local:2", "--jobs", "2"])
    assert usage.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_unreachable_scheduler_is_a_clear_error(tmp_path, capsys):
    from deepstrf.engine import dask_client
    from deepstrf.errors import ClusterError

    with pytest.raises(ClusterError, match="cannot reach a Dask scheduler"):
        with dask_client("tcp://127.0.0.1:9", timeout="2s"):
            pass
