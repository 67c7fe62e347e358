"""NWB-Zarr sessions (hdmf-zarr's Zarr v2 layout, written by deepstrf.testing.nwbzarr from the pynwb
HDF5 file) give the same dataset and store as their HDF5 twin, local and on S3."""

from __future__ import annotations

import json

import pytest
import torch

from deepstrf import open_dataset
from deepstrf.errors import NWBReadError
from deepstrf.io import from_nwb, import_sessions
from deepstrf.testing.nwb import SessionSpec, write_session
from deepstrf.testing.nwbzarr import write_nwb_zarr

DT = 10.0


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(HDF5, NWB-Zarr) pairs: waveform templates with raw data in /acquisition, and images shown
    through an IndexSeries (links and reference datasets)."""
    root = tmp_path_factory.mktemp("nwb-zarr")
    out = {}
    for key, spec in (("audio", SessionSpec(session_id="z-audio", n_units=4, n_stims=3, repeats=2,
                                            extra_bytes=1 << 18, presented_series=True)),
                      ("images", SessionSpec(session_id="z-images", n_units=3, n_stims=3, repeats=2,
                                             stim_kind="images", seed=2))):
        h5, zarr_dir = root / "h5" / f"{key}.nwb", root / "zarr" / f"{key}.nwb.zarr"
        h5.parent.mkdir(exist_ok=True)
        write_session(h5, spec)
        write_nwb_zarr(h5, zarr_dir)
        out[key] = (str(h5), str(zarr_dir))
    return out


def assert_same(a, b) -> None:
    assert (a.get_S(), a.N_neurons) == (b.get_S(), b.N_neurons) and a.stim_meta == b.stim_meta
    assert a.nrn_meta == b.nrn_meta and torch.equal(a.nrn_masks, b.nrn_masks)
    for s in range(a.get_S()):
        assert torch.equal(a.stims[s], b.stims[s])
        for n in range(a.N_neurons):
            assert torch.equal(a.responses[s][n].nan_to_num(-1), b.responses[s][n].nan_to_num(-1))


def card_without_input(card: dict) -> dict:
    imp = {k: v for k, v in card["nwb_import"].items() if k not in ("input", "fingerprint")}
    return {**{k: v for k, v in card.items() if k != "source"}, "nwb_import": imp}


def test_zarr_session_and_its_hdf5_twin_give_identical_stores(twins, tmp_path):
    h5, zarr_dir = twins["audio"]
    results = import_sessions(tmp_path / "h5", [h5], dt_ms=DT, progress=False)
    results += import_sessions(tmp_path / "zarr", [zarr_dir], dt_ms=DT, progress=False)
    assert [r.status for r in results] == ["imported", "imported"]
    assert results[1].store == str(tmp_path / "zarr" / "audio.zarr")
    a, b = (open_dataset(r.store) for r in results)
    assert_same(a, b)
    assert card_without_input(a.card) == card_without_input(b.card)
    assert b.card["nwb_import"]["input"]["url"] == zarr_dir
    [again] = import_sessions(tmp_path / "zarr", [zarr_dir], dt_ms=DT, progress=False)
    assert again.status == "skipped"
    # stimuli cut from a series presented over the session, and video from an IndexSeries into Images
    assert_same(from_nwb(h5, dt_ms=DT, stim_series="presented_audio"),
                from_nwb(zarr_dir, dt_ms=DT, stim_series="presented_audio"))
    h5, zarr_dir = twins["images"]
    assert_same(from_nwb(h5, dt_ms=DT, stim_index_series="image_index"),
                from_nwb(zarr_dir, dt_ms=DT, stim_index_series="image_index"))


def test_zarr_session_on_s3(twins, s3_server):
    import s3fs

    h5, zarr_dir = twins["audio"]
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    url = s3_server.url("dandiset/audio.nwb.zarr")
    fs.put(zarr_dir, url, recursive=True)
    remote = from_nwb(url, dt_ms=DT, storage_options=s3_server.storage_options)
    assert_same(remote, from_nwb(h5, dt_ms=DT))
    assert remote.card["source"] == url and remote.card["nwb_import"]["input"]["version"] not in ("None", "")


def test_pickled_references_are_refused(twins, tmp_path):
    import shutil

    _, zarr_dir = twins["audio"]
    copy = tmp_path / "pickled.nwb.zarr"
    shutil.copytree(zarr_dir, copy)
    meta_path = copy / "general" / "extracellular_ephys" / "electrodes" / "group" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["filters"] = [{"id": "pickle", "protocol": 5}]
    meta_path.write_text(json.dumps(meta))
    (copy / ".zmetadata").unlink()  # read the documents themselves
    with pytest.raises(NWBReadError, match="only the JSON codec is read"):
        from_nwb(copy, dt_ms=DT)


def test_zarr_session_over_https(twins, http_server):
    import shutil

    h5, zarr_dir = twins["images"]
    shutil.copytree(zarr_dir, http_server.root / "images.nwb.zarr")
    remote = from_nwb(http_server.url("images.nwb.zarr"), dt_ms=DT, stim_index_series="image_index")
    assert_same(remote, from_nwb(h5, dt_ms=DT, stim_index_series="image_index"))
