"""``deepstrf import-nwb`` / ``import_sessions``: stores from NWB files that pool, stream and train;
parallel runs, skipping, and remote (S3 with latency) input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepstrf import StreamingNeuralDataset, concat_neural_datasets, open_dataset, save_dataset
from deepstrf.cli import main
from deepstrf.datasets.synthetic import SourceSpec, SyntheticAudioDataset
from deepstrf.demo.training import TrainConfig, build_model, fit
from deepstrf.errors import NWBReadError
from deepstrf.io import from_nwb, import_sessions
from deepstrf.testing.nwb import SessionSpec, write_session

DT = 10.0
LAB_A = SessionSpec(session_id="lab-a-s1", lab="Lab A", n_units=5, n_stims=4, repeats=3)
LAB_B = SessionSpec(session_id="lab-b-s7", lab="Lab B", n_units=4, n_stims=3, repeats=4, stim_kind="spectrogram",
                    spec_bands=32, table="sound_presentations", stim_column="sound",
                    unit_columns=("quality", "depth_um", "snr"), seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nwb-import")
    out = {}
    for spec in (LAB_A, LAB_B):
        out[spec.session_id] = str(root / f"{spec.session_id}.nwb")
        write_session(out[spec.session_id], spec)
    return out


def test_imported_sources_pool_stream_and_train(files, tmp_path):
    a_path, b_path = files["lab-a-s1"], files["lab-b-s7"]
    [ra] = import_sessions(tmp_path, [a_path], dt_ms=DT, license="CC-BY-4.0", progress=False)
    [rb] = import_sessions(tmp_path, [b_path], dt_ms=DT, presentations="sound_presentations", stim_column="sound",
                           progress=False)
    assert (ra.status, rb.status) == ("imported", "imported") and ra.store == str(tmp_path / "lab-a-s1.zarr")
    a, b = open_dataset(ra.store), open_dataset(rb.store)
    mem = from_nwb(a_path, dt_ms=DT)
    assert torch.equal(a.nrn_masks, mem.nrn_masks) and a.nrn_meta == mem.nrn_meta and a.stim_meta == mem.stim_meta
    for s in range(a.get_S()):
        assert torch.equal(a.stims[s], mem.stims[s])
        for n in range(a.N_neurons):
            assert torch.equal(a.responses[s][n].nan_to_num(-1), mem.responses[s][n].nan_to_num(-1))
    assert a.card["license"] == "CC-BY-4.0" and a.card["lab"] == "Lab A" and a.card["nwb_import"]["fingerprint"]

    syn = SyntheticAudioDataset(SourceSpec("SYN", 3, 4, 32, DT, (40, 60), 3, 1.0, "mouse", ("A1",)), seed=3)
    save_dataset(syn, tmp_path / "syn.zarr")
    pool_url = str(tmp_path / "pool.zarr")
    concat_neural_datasets([a, b, open_dataset(tmp_path / "syn.zarr")], names=["A", "B", "SYN"], store=pool_url)
    pool = open_dataset(pool_url)
    assert pool.N_neurons == a.N_neurons + b.N_neurons + 4 and not pool.nrn_masks[0, -1]

    stream = StreamingNeuralDataset(pool_url, batch_size=4, collate="compact", shuffle=True, seed=0)
    seen = sum(len(batch.stim_meta) for batch in stream.loader())
    assert seen == len(pool)

    def batches(epoch):
        stream.set_epoch(epoch)
        return stream.loader()

    cfg = TrainConfig(epochs=2, batch_size=4, channels=(4,), kernel_f=(3,), kernel_t=(4,))
    hist = fit(build_model(pool.N_neurons, pool.F, cfg), batches, cfg, progress=False)
    assert hist.steps >= 2 and all(math.isfinite(x) for x in hist.train_loss)


def test_cli_parallel_skip_and_refusals(tmp_path, capsys):
    paths = []
    for k in range(2):
        paths.append(str(tmp_path / f"sess{k}.nwb"))
        write_session(paths[-1], SessionSpec(session_id=f"s{k}", n_units=3, n_stims=2, repeats=2, seed=10 + k))
    out = str(tmp_path / "stores")
    args = ["import-nwb", out, *paths, "--dt-ms", "10", "--bands", "16", "--license", "CC0-1.0"]
    assert main([*args, "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("imported ") == 2
    assert open_dataset(f"{out}/sess1.zarr").card["session_id"] == "s1"
    assert main(args) == 0                                   # same input, same arguments: nothing to do
    assert capsys.readouterr().out.count("skipped ") == 2
    assert main([*args[:-1], "CC-BY-4.0"]) == 1              # another license: the store would change
    err = capsys.readouterr().err
    assert "Pass --overwrite to replace it" in err and "overwrite=True" not in err and "Traceback" not in err
    assert "before the file changed, or with other arguments" in err  # what a differing fingerprint can mean
    assert main([*args[:-1], "CC-BY-4.0", "--overwrite", "--unit-filter", "quality=good"]) == 0
    assert open_dataset(f"{out}/sess0.zarr").N_neurons == 2 and "imported " in capsys.readouterr().out
    assert main(["import-nwb", str(tmp_path / "other"), paths[0], "--presentations", "passive"]) == 1
    err = capsys.readouterr().err
    assert "no presentation table 'passive'" in err and "--presentations" in err and "Traceback" not in err


def test_s3_with_latency_reads_only_what_it_needs(files, tmp_path, s3_server):
    import s3fs

    local = str(tmp_path / "big.nwb")
    write_session(local, SessionSpec(session_id="lab-a-big", n_units=5, n_stims=4, repeats=3, extra_bytes=24 << 20))
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    url = s3_server.url("sessions/lab-a-big.nwb")
    fs.put(local, url)
    size = fs.size(url)
    sim = s3_server.sim
    before = sim.bytes_sent
    sim.set_latency(0.02)
    try:
        remote = from_nwb(url, dt_ms=DT, storage_options=s3_server.storage_options)
    finally:
        sim.set_latency(0.0)
    fetched = sim.bytes_sent - before
    assert fetched < size / 2, (fetched, size)
    mem = from_nwb(local, dt_ms=DT)
    assert torch.equal(remote.nrn_masks, mem.nrn_masks)
    assert all(torch.equal(remote.responses[s][1], mem.responses[s][1]) for s in range(mem.get_S()))
    out = s3_server.url("imported")
    [r] = import_sessions(out, [url], dt_ms=DT, storage_options=s3_server.storage_options, progress=False)
    assert r.status == "imported" and r.store == f"{out}/lab-a-big.zarr"
    ds = open_dataset(r.store, storage_options=s3_server.storage_options)
    np.testing.assert_array_equal(ds.responses[2][3].numpy(), mem.responses[2][3].numpy())
    [again] = import_sessions(out, [url], dt_ms=DT, storage_options=s3_server.storage_options, progress=False)
    assert again.status == "skipped"



def test_a_storage_error_on_a_remote_file_is_not_only_blamed_on_the_file(tmp_path, s3_server):
    """A remote read that keeps failing (here 503) names the storage as a cause, and what to do."""
    import s3fs

    local = str(tmp_path / "one.nwb")
    write_session(local, SessionSpec(session_id="one", n_units=2, n_stims=2, repeats=2))
    url = s3_server.url("sessions/one.nwb")
    s3fs.S3FileSystem(**s3_server.storage_options).put(local, url)
    fault = s3_server.sim.fail("sessions/one.nwb", status=503, times=None)
    options = {**s3_server.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(NWBReadError, match=r"one.nwb cannot be read as an NWB \(HDF5\) file \(or reading it failed: "
                                           r"check the connection and credentials, then retry\)"):
        from_nwb(url, dt_ms=DT, storage_options=options)
    assert fault.hits > 0

def test_files_left_in_reference_cycles_are_collected_before_the_next_read(files):
    """Garbage from earlier reads (pynwb's objects form reference cycles) is collected by the reading
    thread before it takes h5py's lock: collected later in fsspec's event-loop thread while the reader
    waits on that loop for a remote read, its finalizers would wait for that lock forever."""
    import gc
    import threading

    from deepstrf.io.nwbfile import open_nwb

    class Cycle:
        def __del__(self):
            collected_in.append(threading.current_thread())

    collected_in: list = []
    gc.disable()
    try:
        garbage = Cycle()
        garbage.me = garbage
        del garbage
        with open_nwb(next(iter(files.values()))) as nwb:
            assert collected_in == [threading.current_thread()]  # before the file was opened
            assert nwb.units is not None
    finally:
        gc.enable()


def test_rerun_replaces_the_remains_of_an_interrupted_write(tmp_path, capsys):
    # an import killed while it wrote in place (on an object store) left objects but no root
    # zarr.json; the same command then refused them ("pass --overwrite") instead of finishing
    path = str(tmp_path / "sess.nwb")
    write_session(path, SessionSpec(session_id="s", n_units=3, n_stims=2, repeats=2))
    out = tmp_path / "stores"
    (out / "sess.zarr" / "responses").mkdir(parents=True)
    (out / "sess.zarr" / "responses" / "zarr.json").write_text("{}")
    args = ["import-nwb", str(out), path, "--dt-ms", "10"]
    assert main(args) == 0 and "imported " in capsys.readouterr().out
    assert open_dataset(str(out / "sess.zarr")).card["session_id"] == "s"
    (out / "other.zarr").mkdir()
    (out / "other.zarr" / "notes.txt").write_text("mine")  # not deepstrf's: never deleted without asking
    other = str(tmp_path / "other.nwb")
    write_session(other, SessionSpec(session_id="o", n_units=3, n_stims=2, repeats=2))
    assert main(["import-nwb", str(out), other, "--dt-ms", "10"]) == 1
    assert "is not a deepstrf store" in capsys.readouterr().err and (out / "other.zarr" / "notes.txt").exists()
