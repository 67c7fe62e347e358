"""NWB import: real files written with pynwb (deepstrf.testing.nwb), read with deepstrf.io.from_nwb."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.video import VideoNeuralDataset
from deepstrf.datasets.views import is_missing
from deepstrf.errors import NWBImportError, NWBReadError
from deepstrf.io import from_nwb
from deepstrf.io.binning import BinPlan
from deepstrf.io.spectrogram import MelSpec, log_mel
from deepstrf.testing.nwb import SessionSpec, write_session

DT = 10.0
LAB_A = SessionSpec(session_id="lab-a-s1", lab="Lab A", n_units=5, n_stims=4, repeats=3, stim_kind="waveform")
LAB_B = SessionSpec(session_id="lab-b-s7", lab="Lab B", n_units=4, n_stims=3, repeats=4, stim_kind="spectrogram",
                    spec_bands=32, table="sound_presentations", stim_column="sound",
                    unit_columns=("quality", "depth_um", "snr"), seed=1, related_publications=())
LAB_C = SessionSpec(session_id="lab-c-s2", lab="Lab C", n_units=3, n_stims=3, repeats=2, stim_kind="images", seed=2)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("nwb")
    out = {}
    for key, spec in (("a", LAB_A), ("b", LAB_B), ("c", LAB_C)):
        path = root / f"{spec.session_id}.nwb"
        out[key] = (str(path), write_session(path, spec))
    return out


def expected_cell(truth, spec, s: int, n: int, dt_s: float, n_bins: int):
    """Direct binning: counts of unit n over each presentation of stim s inside its obs interval."""
    rows = []
    for p in np.flatnonzero(truth.stim == s):
        a = truth.starts[p]
        iv = truth.obs_intervals[n]
        if not ((iv[:, 0] <= a) & (a + n_bins * dt_s <= iv[:, 1])).any():
            continue
        spk = truth.spikes[n]
        rows.append([np.sum((spk >= a + k * dt_s) & (spk < a + (k + 1) * dt_s)) for k in range(n_bins)])
    return np.array(rows, dtype=np.float32) if rows else None


def test_counts_and_missing_cells_match_direct_binning(sessions):
    path, truth = sessions["a"]
    ds = from_nwb(path, dt_ms=DT)
    assert isinstance(ds, AudioNeuralDataset) and ds.F == 32 and ds.N_neurons == LAB_A.n_units
    n_bins = int(LAB_A.stim_s * 1000 / DT)
    stim_index = {m["stim"]: i for i, m in enumerate(ds.stim_meta)}
    missing = 0
    for name_s, s in stim_index.items():
        s_truth = truth.stim_names.index(name_s)
        assert ds.stims[s].shape == (1, 32, n_bins)
        for n in range(ds.N_neurons):
            want = expected_cell(truth, LAB_A, s_truth, n, DT / 1000, n_bins)
            cell = ds.responses[s][n]
            if want is None:
                missing += 1
                assert is_missing(cell) and not ds.nrn_masks[s, n]
            else:
                assert torch.equal(cell, torch.from_numpy(want))
    assert missing > 0  # unit 0 was recorded over part of the session only
    assert int(ds.responses[0][1].sum()) > 0


def test_precomputed_spectrogram_and_custom_intervals(sessions):
    path, truth = sessions["b"]
    ds = from_nwb(path, dt_ms=DT, presentations="sound_presentations", stim_column="sound")
    assert ds.F == 32 and ds.get_S() == LAB_B.n_stims
    with h5py.File(path, "r") as f:
        data = f[f"stimulus/templates/{ds.stim_meta[0]['stim']}/data"][:]
    frames_per_bin = int(LAB_B.spec_rate * DT / 1000)   # 200 Hz frames, 10 ms bins: 2 frames per bin
    want = data.reshape(-1, frames_per_bin, 32).mean(1).T
    np.testing.assert_allclose(ds.stims[0][0].numpy(), want, rtol=1e-5)
    n_bins = want.shape[1]
    s_truth = truth.stim_names.index(ds.stim_meta[0]["stim"])
    want_counts = expected_cell(truth, LAB_B, s_truth, 2, DT / 1000, n_bins)
    np.testing.assert_array_equal(ds.responses[0][2].numpy(), want_counts)


def test_metadata_card_and_unit_filter(sessions):
    path, _ = sessions["b"]
    ds = from_nwb(path, dt_ms=DT, presentations="sound_presentations", stim_column="sound",
                  unit_filter={"quality": "good"}, license="CC-BY-4.0")
    kept = [u for u in range(LAB_B.n_units) if u % 3]      # the generator's "good" units
    assert [m["unit_id"] for m in ds.nrn_meta] == kept
    m = ds.nrn_meta[0]
    assert m["uid"] == f"lab-b-s7/unit{kept[0]}" and m["quality"] == "good" and m["depth_um"] == 100.0 * kept[0]
    assert m["area"] == m["electrode_location"] in ("A1", "AAF") and "electrode_y" in m
    sm = ds.stim_meta[0]
    assert sm["uid"] == f"lab-b-s7/{sm['stim']}" and sm["n_presentations"] == LAB_B.repeats
    assert sm["stim_type"] in ("tone", "noise") and sm["presentation_table"] == "sound_presentations"
    card = ds.card
    assert card["license"] == "CC-BY-4.0" and card["lab"] == "Lab B" and card["institution"] == "Lab B Institute"
    assert card["experimenter"] == ["Doe, Jane"] and "synthetic auditory session" in card["description"]
    imp = card["nwb_import"]
    assert imp["options"]["unit_filter"] == {"quality": ["good"]} and imp["resolved"]["stim_kind"] == "spectrogram"
    assert imp["fingerprint"].startswith("sha256:") and imp["input"]["size"] > 0
    a = from_nwb(sessions["a"][0], dt_ms=DT)
    assert a.card["doi"] == ["doi:10.1234/example.5678"]
    assert a.card["nwb_import"]["resolved"]["mel"]["hop_samples"] == 80


def test_video_from_index_series(sessions):
    path, truth = sessions["c"]
    ds = from_nwb(path, dt_ms=DT, stim_index_series="image_index")
    assert isinstance(ds, VideoNeuralDataset) and (ds.H, ds.W) == (6, 8)
    with h5py.File(path, "r") as f:
        img = f[f"stimulus/templates/stim_images/img{int(ds.stim_meta[0]['stim']):03d}"][:]
    x = ds.stims[0]
    assert x.shape == (1, 6, 8, 50)
    np.testing.assert_allclose(x[0, :, :, 17].numpy(), img, rtol=1e-6)
    assert torch.equal(x[..., 0], x[..., -1])


def test_video_from_image_series_templates(tmp_path):
    path = tmp_path / "movies.nwb"
    write_session(path, SessionSpec(session_id="lab-v", n_units=2, n_stims=2, repeats=2, stim_kind="video"))
    ds = from_nwb(path, dt_ms=DT)
    assert isinstance(ds, VideoNeuralDataset) and ds.stims[0].shape == (1, 6, 8, 50)
    with h5py.File(path, "r") as f:
        frames = f[f"stimulus/templates/{ds.stim_meta[0]['stim']}/data"][:].astype(np.float32)
    # 30 Hz frames in 10 ms bins: bin 4 ([40, 50) ms) lies in frame 1 ([33.3, 66.7) ms); bin 3 straddles 0 and 1
    np.testing.assert_allclose(ds.stims[0][0, :, :, 4].numpy(), frames[1], rtol=1e-6)
    w = (100 / 3 - 30) / 10
    np.testing.assert_allclose(ds.stims[0][0, :, :, 3].numpy(), w * frames[0] + (1 - w) * frames[1], rtol=1e-5)


def test_stimuli_cut_from_the_presented_series(tmp_path):
    path = tmp_path / "played.nwb"
    write_session(path, SessionSpec(session_id="lab-p", n_units=2, n_stims=3, repeats=2, presented_series=True))
    from_templates = from_nwb(path, dt_ms=DT)
    from_played = from_nwb(path, dt_ms=DT, stim_series="presented_audio")
    assert from_played.card["nwb_import"]["options"]["stim_series"] == "presented_audio"
    for a, b in zip(from_templates.stims, from_played.stims):
        assert a.shape == b.shape
        # the same sound, cut at its first presentation (to the nearest sample)
        assert torch.corrcoef(torch.stack([a.exp().flatten(), b.exp().flatten()]))[0, 1] > 0.99
    assert torch.equal(from_templates.responses[1][1], from_played.responses[1][1])


def test_pre_post_window_and_waveform_transform(sessions):
    path, truth = sessions["a"]
    ds = from_nwb(path, dt_ms=DT, pre_ms=50, post_ms=20)
    assert ds.stims[0].shape[-1] == 50 + 5 + 2 and ds.responses[0][1].shape[-1] == 57
    n = 1
    s_truth = truth.stim_names.index(ds.stim_meta[0]["stim"])
    p = np.flatnonzero(truth.stim == s_truth)[0]
    a = truth.starts[p] - 0.05
    want = [np.sum((truth.spikes[n] >= a + k / 100) & (truth.spikes[n] < a + (k + 1) / 100)) for k in range(57)]
    np.testing.assert_array_equal(ds.responses[0][n][0].numpy(), want)
    # the transform: deterministic, a tone's energy moves up the bands with its frequency
    fs, t = 8000.0, np.arange(4000) / 8000.0
    spec = MelSpec(bands=16)
    low, high = (log_mel(np.sin(2 * np.pi * f * t), fs, DT, 50, spec) for f in (300.0, 2000.0))
    assert torch.equal(low, log_mel(np.sin(2 * np.pi * 300.0 * t), fs, DT, 50, spec))
    assert int(low[:, 25].argmax()) < int(high[:, 25].argmax())
    # 44.1 kHz at 5 ms: hop 220.5 samples -> resampled to 44 kHz, frames stay on the bins
    assert log_mel(np.zeros(44100), 44100.0, 5.0, 200, spec).shape == (16, 200)


@pytest.mark.parametrize("kwargs, needle", [
    ({"presentations": "passive_playback"}, "no presentation table 'passive_playback'"),
    ({"stim_column": "song"}, "no column 'song'"),
    ({"stim_column": "stim_type"}, "no series of that name in /stimulus_template"),
    ({"stim_series": "microphone"}, "no series 'microphone'"),
    ({"stim_index_series": "frames"}, "no IndexSeries 'frames'"),
    ({"unit_filter": {"isolation": "good"}}, "no scalar column 'isolation'"),
    ({"unit_filter": {"quality": "excellent"}}, "no unit left"),
    ({"stim_kind": "video"}, "stim_kind='video'"),
    ({"dt_ms": 0}, "dt_ms must be a positive"),
    ({"dt_ms": 900.0}, "less than one bin"),
])
def test_refusals_name_what_and_the_argument(sessions, kwargs, needle):
    path, _ = sessions["a"]
    with pytest.raises(NWBImportError) as e:
        from_nwb(path, **{"dt_ms": DT, **kwargs})
    assert needle in str(e.value) and path in str(e.value) or "dt_ms" in kwargs
    assert "--" in str(e.value) or "dt_ms" in kwargs


def test_refusals_of_files(tmp_path):
    write_session(tmp_path / "nounits.nwb", SessionSpec(n_units=0))
    with pytest.raises(NWBImportError, match="no units table"):
        from_nwb(tmp_path / "nounits.nwb", dt_ms=DT)
    (tmp_path / "notnwb.nwb").write_bytes(b"not an hdf5 file")
    with pytest.raises(NWBReadError, match="notnwb.nwb"):
        from_nwb(tmp_path / "notnwb.nwb", dt_ms=DT)
    with pytest.raises(NWBReadError, match="no NWB file"):
        from_nwb(tmp_path / "absent.nwb", dt_ms=DT)


def test_https_byte_ranges(sessions, http_server):
    path, _ = sessions["a"]
    shutil.copy(path, http_server.root / "lab-a.nwb")
    remote = from_nwb(http_server.url("lab-a.nwb"), dt_ms=DT)
    local = from_nwb(path, dt_ms=DT)
    assert torch.equal(remote.nrn_masks, local.nrn_masks)
    assert torch.equal(remote.responses[1][2], local.responses[1][2]) and torch.equal(remote.stims[1], local.stims[1])
    assert remote.card["source"] == http_server.url("lab-a.nwb")


def test_bin_plan_overlapping_windows_and_spikes_on_edges():
    rng = np.random.default_rng(5)
    dt = 0.01
    starts = np.array([0.0, 0.03, 0.5, 0.52, 0.51, 0.9])
    n_bins = np.array([10, 10, 4, 6, 3, 1])
    spikes = np.sort(np.concatenate([rng.uniform(-0.1, 1.0, 400), starts + 3 * dt, starts + n_bins * dt]))
    want = np.concatenate([[np.sum((spikes >= a + k * dt) & (spikes < a + (k + 1) * dt)) for k in range(n)]
                           for a, n in zip(starts, n_bins)])
    plan = BinPlan(starts, n_bins, dt)
    assert len(plan.layers) == 3
    np.testing.assert_array_equal(plan.count(spikes), want)


def test_only_dois_are_recorded_as_dois(tmp_path):
    # free text holding "10." and "/" was recorded as a DOI, and `cite --bibtex` printed it as one
    pubs = ("Smith J et al. (2020) Responses to 10.5 kHz tones/clicks. J Neurosci 40:1-10",
            "doi:10.1523/JNEUROSCI.0001-20.2020", "https://doi.org/10.1038/nn.4350")
    path = str(tmp_path / "s.nwb")
    write_session(path, SessionSpec(session_id="s", n_units=2, n_stims=2, repeats=2, related_publications=pubs))
    card = from_nwb(path, dt_ms=DT).card
    assert card["doi"] == list(pubs[1:]) and card["related_publications"] == list(pubs)


@pytest.mark.parametrize("data, needle", [
    (np.zeros(0, np.float32), r"holds no samples \(shape \(0,\)\)"),
    (np.zeros((0, 8), np.float32), r"holds no samples \(shape \(0, 8\)\)"),
    (np.ones((40, 8, 2), np.float32), r"has shape \(40, 8, 2\).*ImageSeries"),
], ids=["empty-waveform", "empty-spectrogram", "three-axes"])
def test_stimulus_templates_without_data_or_with_three_axes_are_refused(tmp_path, data, needle):
    """Before: an empty waveform imported as a constant stimulus, an empty spectrogram failed with a
    bare IndexError and a (time, F, 2) template was refused only by save_dataset, naming no series."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    nwb = NWBFile(session_description="x", identifier="odd", session_id="odd",
                  session_start_time=datetime(2026, 1, 1, tzinfo=timezone.utc))
    nwb.add_stimulus_template(TimeSeries(name="a", data=data, unit="a.u.", rate=200.0, starting_time=0.0))
    nwb.add_trial_column("stim_name", "stim")
    for k in range(2):
        nwb.add_trial(start_time=1.0 + 0.3 * k, stop_time=1.2 + 0.3 * k, stim_name="a")
    nwb.add_unit(spike_times=np.linspace(0.1, 2.9, 40))
    with NWBHDF5IO(str(tmp_path / "odd.nwb"), "w") as io:
        io.write(nwb)
    with pytest.raises(NWBImportError, match=r"stimulus series 'a' " + needle):
        from_nwb(str(tmp_path / "odd.nwb"), dt_ms=10.0)
