"""External stimuli (``stim_dir=`` / ``--stim-dir``): WAV files written with soundfile, .npy arrays,
local and on S3, give the same dataset as the waveforms embedded in the NWB file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepstrf import open_dataset
from deepstrf.cli import main
from deepstrf.errors import NWBImportError
from deepstrf.io import from_nwb
from deepstrf.testing.nwb import SessionSpec, write_session

soundfile = pytest.importorskip("soundfile")

DT = 10.0
SPEC = dict(session_id="lab-w-s1", lab="Lab W", n_units=4, n_stims=3, repeats=2, seed=7)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same session twice: waveforms embedded, and as WAV files in a folder."""
    root = tmp_path_factory.mktemp("stimfiles")
    embedded, external, folder = root / "embedded.nwb", root / "external" / "lab-w-s1.nwb", root / "sounds"
    external.parent.mkdir()
    write_session(embedded, SessionSpec(**SPEC))
    write_session(external, SessionSpec(**SPEC, stim_folder=str(folder)))
    return str(embedded), str(external), folder


def assert_same_content(a, b) -> None:
    assert a.get_S() == b.get_S() and a.N_neurons == b.N_neurons and a.F == b.F
    assert a.stim_meta == b.stim_meta and a.nrn_meta == b.nrn_meta
    for s in range(a.get_S()):
        assert torch.equal(a.stims[s], b.stims[s])
        for n in range(a.N_neurons):
            assert torch.equal(a.responses[s][n].nan_to_num(-1), b.responses[s][n].nan_to_num(-1))


def test_wav_folder_equals_embedded_waveforms(twins, tmp_path, capsys):
    embedded, external, folder = twins
    assert sorted(p.name for p in folder.iterdir()) == [f"labw_stim{s:03d}.wav" for s in range(3)]
    with pytest.raises(NWBImportError, match="no series of that name in /stimulus_template"):
        from_nwb(external, dt_ms=DT)
    ds = from_nwb(external, dt_ms=DT, stim_dir=str(folder))
    assert_same_content(ds, from_nwb(embedded, dt_ms=DT))
    assert ds.card["nwb_import"]["input"]["stim_dir"]["files"] == 3

    out = str(tmp_path / "stores")
    args = ["import-nwb", out, external, "--dt-ms", "10", "--stim-dir", str(folder)]
    assert main(args) == 0 and main(args) == 0
    assert "skipped " in capsys.readouterr().out
    assert_same_content(open_dataset(f"{out}/lab-w-s1.zarr"), ds)
    (folder / "labw_stim001.wav").write_bytes((folder / "labw_stim002.wav").read_bytes())
    assert main(args) == 1                       # a stimulus file changed: the store would change
    assert "--overwrite" in capsys.readouterr().err


def test_npy_arrays_on_s3_and_missing_names(twins, s3_server):
    import s3fs

    embedded, external, _ = twins
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    remote = s3_server.url("stimuli")
    reference = from_nwb(embedded, dt_ms=DT)
    for m in reference.stim_meta[:2]:
        with fs.open(f"{remote}/{m['stim']}.npy", "wb") as f:
            np.save(f, _embedded_wave(embedded, m["stim"]))
    with pytest.raises(NWBImportError) as e:
        from_nwb(external, dt_ms=DT, stim_dir=remote, stim_rate=8000.0, storage_options=s3_server.storage_options)
    assert f"1 of 3 stimuli have no file in stim_dir {remote}" in str(e.value)
    assert reference.stim_meta[2]["stim"] in str(e.value) and "--stim-dir" in str(e.value)

    with fs.open(f"{remote}/{reference.stim_meta[2]['stim']}.npy", "wb") as f:
        np.save(f, _embedded_wave(embedded, reference.stim_meta[2]["stim"]))
    with pytest.raises(NWBImportError, match="--stim-rate"):
        from_nwb(external, dt_ms=DT, stim_dir=remote, storage_options=s3_server.storage_options)
    ds = from_nwb(external, dt_ms=DT, stim_dir=remote, stim_rate=8000.0, storage_options=s3_server.storage_options)
    assert_same_content(ds, reference)


def _embedded_wave(path: str, name: str) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f[f"stimulus/templates/{name}/data"][:]
