"""Write small (or Neuropixels-sized) synthetic NWB sessions with pynwb, with the ground truth.

Used by the NWB import tests, ``examples/import_nwb.py`` and ``scripts/bench_import.py``: real
files written by the reference library, never mocks. The library itself never imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np


@dataclass
class SessionSpec:
    """What to write. ``stim_kind``: ``"waveform"`` (1-D templates), ``"spectrogram"`` (``(time, F)``
    templates), ``"video"`` (``ImageSeries`` templates) or ``"images"`` (an IndexSeries into an
    ``Images`` container). ``presented_series`` also writes the waveforms as played over the
    session (``/stimulus/presented_audio``). ``stim_folder`` writes waveform stimuli as WAV files
    (32-bit float, through ``soundfile``) into that folder instead of into the file; the session is
    otherwise the same as without it."""

    session_id: str = "lab-a-session-1"
    lab: str = "Lab A"
    n_units: int = 6
    n_stims: int = 4
    repeats: int = 3
    stim_s: float = 0.5
    gap_s: float = 0.2
    stim_kind: str = "waveform"
    audio_fs: float = 8000.0
    video_rate: float = 30.0
    presented_series: bool = False
    stim_folder: str | None = None       # waveforms written there as <name>.wav (float32), not as templates
    spec_rate: float = 200.0
    spec_bands: int = 16
    table: str = "trials"                # or a custom /intervals table name
    stim_column: str = "stim_name"
    unit_columns: tuple[str, ...] = ("quality",)
    partial_units: int = 1               # units recorded only until half the stims were presented once
    rate_hz: float = 20.0
    extra_bytes: int = 0                 # an acquisition series nobody reads (like raw data or LFP)
    seed: int = 0
    related_publications: tuple[str, ...] = ("doi:10.1234/example.5678",)


@dataclass
class SessionTruth:
    """What was written: presentations and spikes, to check an import against."""

    starts: np.ndarray
    stops: np.ndarray
    stim: np.ndarray                      # stim index of each presentation
    stim_names: list
    spikes: list[np.ndarray]
    obs_intervals: list[np.ndarray]
    unit_ids: list[int] = field(default_factory=list)


def write_session(path: str | os.PathLike, spec: SessionSpec) -> SessionTruth:
    """Write one NWB file at ``path`` and return its ground truth."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.base import ImageReferences, Images
    from pynwb.epoch import TimeIntervals
    from pynwb.image import GrayscaleImage, ImageSeries, IndexSeries

    rng = np.random.default_rng(spec.seed)
    nwb = NWBFile(session_description=f"synthetic auditory session of {spec.lab}", identifier=spec.session_id,
                  session_start_time=datetime(2026, 1, 1, tzinfo=timezone.utc), session_id=spec.session_id,
                  lab=spec.lab, institution=f"{spec.lab} Institute", experimenter=["Doe, Jane"],
                  related_publications=list(spec.related_publications))
    order = np.concatenate([rng.permutation(spec.n_stims) for _ in range(spec.repeats)])
    period = spec.stim_s + spec.gap_s
    starts = 1.0 + np.arange(len(order)) * period + rng.uniform(0, 0.01, len(order))
    stops = starts + spec.stim_s
    end = float(stops[-1] + 1.0)
    names = [f"{spec.lab.replace(' ', '').lower()}_stim{s:03d}" for s in range(spec.n_stims)]

    if spec.stim_kind == "images":
        imgs = [GrayscaleImage(name=f"img{s:03d}", data=rng.random((6, 8)), description="natural-like image")
                for s in range(spec.n_stims)]
        images = Images(name="stim_images", images=imgs, description="presented images",
                        order_of_images=ImageReferences(name="order_of_images", data=imgs))
        nwb.add_stimulus_template(images)
        nwb.add_stimulus(IndexSeries(name="image_index", data=order.astype(np.uint32), unit="N/A",
                                     indexed_images=images, timestamps=starts))
    else:
        waves = []
        for s, name in enumerate(names):
            if spec.stim_kind == "video":
                frames = rng.integers(0, 255, (int(spec.stim_s * spec.video_rate), 6, 8), dtype=np.uint8)
                nwb.add_stimulus_template(ImageSeries(name=name, data=frames, unit="n.a.", rate=spec.video_rate,
                                                      starting_time=0.0, description=f"movie {s}"))
                continue
            if spec.stim_kind == "waveform":
                t = np.arange(int(spec.stim_s * spec.audio_fs)) / spec.audio_fs
                data = np.sin(2 * np.pi * (300 + 200 * s) * t) * rng.uniform(0.5, 1.0)
                rate = spec.audio_fs
                waves.append(data)
            else:
                data = rng.random((int(spec.stim_s * spec.spec_rate), spec.spec_bands))
                rate = spec.spec_rate
            if spec.stim_folder is not None and spec.stim_kind == "waveform":
                import soundfile

                os.makedirs(spec.stim_folder, exist_ok=True)
                soundfile.write(os.path.join(spec.stim_folder, f"{name}.wav"), data.astype(np.float32),
                                int(rate), subtype="FLOAT")
                continue
            nwb.add_stimulus_template(TimeSeries(name=name, data=data.astype(np.float32), unit="a.u.", rate=rate,
                                                 starting_time=0.0, description=f"stimulus {s}"))
        if spec.presented_series and waves:
            played = np.zeros(int((stops[-1] + 1.0) * spec.audio_fs), dtype=np.float32)
            for p, s in enumerate(order.tolist()):
                j = round(starts[p] * spec.audio_fs)
                played[j:j + len(waves[s])] = waves[s]
            nwb.add_stimulus(TimeSeries(name="presented_audio", data=played, unit="a.u.", rate=spec.audio_fs,
                                        starting_time=0.0, description="the sound as played"))
    if spec.extra_bytes:
        n = spec.extra_bytes // (2 * 32)
        nwb.add_acquisition(TimeSeries(name="lfp_like", data=rng.integers(-500, 500, (n, 32), dtype=np.int16),
                                       unit="uV", rate=1000.0))

    columns = {"stim_type": "kind of stimulus"}
    if spec.stim_kind != "images":
        columns[spec.stim_column] = "stimulus template name"
    intervals = TimeIntervals(name=spec.table, description="stimulus presentations")
    for col, desc in columns.items():
        intervals.add_column(col, desc)
    for p, s in enumerate(order.tolist()):
        row = {"stim_type": "tone" if s % 2 else "noise"}
        if spec.stim_kind != "images":
            row[spec.stim_column] = names[s]
        intervals.add_interval(start_time=float(starts[p]), stop_time=float(stops[p]), **row)
    if spec.table == "trials":
        nwb.trials = intervals
    else:
        nwb.add_time_intervals(intervals)

    device = nwb.create_device("probe")
    group = nwb.create_electrode_group("shank0", description="shank", location="A1", device=device)
    for e in range(4):
        nwb.add_electrode(group=group, location=("A1", "AAF")[e % 2], x=0.0, y=100.0 * e, z=0.0)
    for col in spec.unit_columns if spec.n_units else ():  # no unit: the file has no units table
        nwb.add_unit_column(col, f"unit {col}")
    spikes, obs = [], []
    for u in range(spec.n_units):
        partial = u < spec.partial_units
        iv = np.array([[0.0, float(starts[spec.n_stims // 2]) if partial else end]])
        n = rng.poisson(spec.rate_hz * iv[0, 1])
        st = np.sort(rng.uniform(0.0, iv[0, 1], n))
        extra = {"quality": "good" if u % 3 else "mua", "depth_um": 100.0 * u, "snr": 2.0 + u}
        nwb.add_unit(spike_times=st, obs_intervals=iv, electrodes=[u % 4],
                     **{c: extra.get(c, f"{c}-{u}") for c in spec.unit_columns})
        spikes.append(st)
        obs.append(iv)
    with NWBHDF5IO(os.fspath(path), "w") as io:
        io.write(nwb)
    stim_names = names if spec.stim_kind != "images" else list(range(spec.n_stims))
    return SessionTruth(starts, stops, order, stim_names, spikes, obs, list(range(spec.n_units)))
