"""``from_nwb``: one NWB session -> an ``AudioNeuralDataset`` / ``VideoNeuralDataset``, read with pynwb.

Neurons are the units (``/units``), stimuli the distinct values of the stimulus identity over the
presentation table (``/intervals/trials`` or another ``/intervals`` table), each presentation of a
stimulus a repeat. Every conversion choice is a field of :class:`NWBConversion` and is recorded in
the dataset card (``card["nwb_import"]``), hence in the store written from it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets.audio import AudioNeuralDataset
from ..datasets.neural_dataset import NeuralDataset
from ..datasets.video import VideoNeuralDataset
from ..errors import NWBImportError, NWBReadError
from .binning import BinPlan, bin_average, recorded
from .counts import PresentationCounts
from ..store.citations import is_doi
from ..store.location import canonical_url
from .nwbfile import fingerprint, input_identity, open_nwb
from .spectrogram import MelSpec, log_mel
from .stimfiles import StimulusFolder

STIM_KINDS = ("auto", "waveform", "spectrogram", "video")
EXTERNAL_STIM_FIELDS = ("stim_dir", "stim_rate")


@dataclass(frozen=True)
class NWBConversion:
    """How an NWB session becomes a dataset (see :func:`from_nwb` for each field)."""

    dt_ms: float
    presentations: str = "trials"
    stim_column: str | None = "stim_name"
    stim_index_series: str | None = None
    stim_series: str | None = None
    stim_kind: str = "auto"
    mel: MelSpec = field(default_factory=MelSpec)
    pre_ms: float = 0.0
    post_ms: float = 0.0
    unit_filter: dict[str, list] | None = None
    use_obs_intervals: bool = True
    stim_dir: str | None = None
    stim_rate: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.dt_ms, (int, float)) and self.dt_ms > 0):
            raise NWBImportError(f"dt_ms must be a positive number of milliseconds, got {self.dt_ms!r} (--dt-ms).")
        if self.stim_kind not in STIM_KINDS:
            raise NWBImportError(f"stim_kind must be one of {STIM_KINDS}, got {self.stim_kind!r} (--stim-kind).")
        if self.pre_ms < 0 or self.post_ms < 0:
            raise NWBImportError(f"pre_ms and post_ms must be >= 0, got {self.pre_ms}, {self.post_ms}.")
        if self.unit_filter is not None:
            object.__setattr__(self, "unit_filter", {str(k): list(v) if isinstance(v, (list, tuple, set)) else [v]
                                                     for k, v in self.unit_filter.items()})
        if self.stim_dir is not None:
            if self.stim_series is not None or self.stim_index_series is not None:
                raise NWBImportError("stim_dir reads the stimuli from files named by stim_column; it does not "
                                     "combine with stim_series or stim_index_series (--stim-series, "
                                     "--stim-index-series).")
            object.__setattr__(self, "stim_dir", canonical_url(self.stim_dir))
        if self.stim_rate is not None and not self.stim_rate > 0:
            raise NWBImportError(f"stim_rate must be a positive rate in Hz, got {self.stim_rate!r} (--stim-rate).")

    def as_dict(self) -> dict[str, Any]:
        """Every field; the external-stimulus fields only when set, so that imports made before they
        existed keep their fingerprint."""
        return {k: v for k, v in asdict(self).items() if k not in EXTERNAL_STIM_FIELDS or v is not None}


def from_nwb(path_or_url: str | os.PathLike, *, dt_ms: float, presentations: str = "trials",
             stim_column: str | None = "stim_name", stim_index_series: str | None = None,
             stim_series: str | None = None, stim_kind: str = "auto", bands: int = 32, f_min: float = 50.0,
             f_max: float | None = None, window_ms: float = 25.0, pre_ms: float = 0.0, post_ms: float = 0.0,
             unit_filter: dict[str, Any] | None = None, use_obs_intervals: bool = True, stim_dir: str | None = None,
             stim_rate: float | None = None, name: str | None = None, license: str | None = None,
             storage_options: dict | None = None, progress: bool = False) -> NeuralDataset:
    """Read one NWB session into a dataset of binned spike counts.

    - ``dt_ms``: bin width. Counts are taken in half-open bins ``[a, a + dt)`` aligned to each
      presentation's ``start_time`` minus ``pre_ms`` (rounded to whole bins); a stimulus lasts the
      shortest of its presentations (``stop_time - start_time``, whole bins) plus ``pre_ms`` and
      ``post_ms``.
    - ``presentations``: ``"trials"`` or the name of a table in ``/intervals``.
    - Stimulus identity: the column ``stim_column`` of that table, or, with ``stim_index_series``,
      the value ``k`` of that ``IndexSeries`` (in ``/stimulus``) at each presentation's start; the
      stimulus is then image ``k`` of its ``indexed_images`` (or frame ``k`` of its
      ``indexed_timeseries``), shown for the whole presentation (a video stimulus).
    - Stimulus content: the ``/stimulus_template`` series named by the identity, or with
      ``stim_series`` the window of that series (``/stimulus`` or ``/acquisition``, presented over
      the session) at the stimulus' first presentation. A 1-D series is a waveform (-> log-mel
      spectrogram, :mod:`deepstrf.io.spectrogram`, with ``bands``, ``f_min``, ``f_max``,
      ``window_ms``), a 2-D series ``(time, F)`` a precomputed spectrogram, an ``ImageSeries`` a
      video; both averaged over each bin. ``stim_kind`` forces one reading.
    - ``stim_dir``: the stimuli are files in that folder (local or URL) named after the values of
      ``stim_column`` (``.wav`` / ``.flac``, or ``.npy`` sampled at ``stim_rate`` per second; see
      :mod:`deepstrf.io.stimfiles`), read like an embedded series of the same content.
    - ``unit_filter``: ``{column: value or [values]}`` of the units table; units whose value is not
      listed (compared as text) are dropped. ``use_obs_intervals``: a unit counts as recorded during a presentation
      only if the presentation lies inside one of its ``obs_intervals``; stim x unit pairs never
      recorded are missing (the sentinel), never zeros.
    - ``name``, ``license``: the dataset's name (default: the session id) and the card's license.

    Remote URLs (``s3://``, ``https://``) are read by byte ranges with ``storage_options``.
    """
    conv = NWBConversion(dt_ms=float(dt_ms), presentations=presentations, stim_column=stim_column,
                         stim_index_series=stim_index_series, stim_series=stim_series, stim_kind=stim_kind,
                         mel=MelSpec(bands=bands, f_min=f_min, f_max=f_max, window_ms=window_ms),
                         pre_ms=pre_ms, post_ms=post_ms, unit_filter=unit_filter,
                         use_obs_intervals=use_obs_intervals, stim_dir=stim_dir, stim_rate=stim_rate)
    return read_nwb(path_or_url, conv, name=name, license=license, storage_options=storage_options,
                    progress=progress)


def read_nwb(path_or_url: str | os.PathLike, conv: NWBConversion, *, name: str | None = None,
             license: str | None = None, storage_options: dict | None = None, progress: bool = False) -> NeuralDataset:
    """:func:`from_nwb` with the conversion given as one :class:`NWBConversion`."""
    folder = stim_folder(conv, storage_options)
    identity = session_identity(path_or_url, storage_options, folder)
    with open_nwb(path_or_url, storage_options, keep=(conv.stim_series,) if conv.stim_series else ()) as nwb:
        try:
            return _Session(nwb, identity["url"], conv, folder).dataset(identity, name=name, license=license,
                                                                         progress=progress)
        except OSError as e:  # h5py / fsspec failing part-way through the file
            raise NWBReadError(f"{identity['url']}: reading failed ({type(e).__name__}: {e}). Check that the "
                               "file is complete and reachable, then run the import again.") from e


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S" or (values.dtype.kind == "O" and any(isinstance(v, bytes) for v in values[:1])):
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def sample_rate(series: Any) -> float:
    """Samples per second of a series (its ``rate``, else from its median timestamp step)."""
    return float(series.rate) if series.rate else 1.0 / float(np.median(np.diff(series.timestamps[:])))


def _strings(value: Any) -> list[str]:
    """An NWB text field that may be one string or a list of them, as a list."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, bytes)) else [str(v) for v in value]


def scalar_column(table: Any, col: str) -> np.ndarray | None:
    """The values of a column holding one number or string per row, else None (ragged, region,
    multi-dimensional or object references)."""
    from hdmf.common import DynamicTableRegion, VectorIndex

    column = table[col]
    if isinstance(column, (VectorIndex, DynamicTableRegion)):
        return None
    values = _decode(np.asarray(column.data[:]))
    if values.ndim != 1:
        return None
    if values.dtype.kind == "O" and not all(isinstance(v, str) for v in values.tolist()):
        return None
    return values


class _Session:
    """The pieces of one open NWB file that the conversion reads."""

    def __init__(self, nwb: Any, url: str, conv: NWBConversion, folder: StimulusFolder | None = None) -> None:
        self.nwb, self.url, self.conv, self.folder = nwb, url, conv, folder
        self.session_id = str(nwb.session_id or nwb.identifier)
        self.dt_s = conv.dt_ms / 1000.0
        self.pre_bins = round(conv.pre_ms / conv.dt_ms)
        self.post_bins = round(conv.post_ms / conv.dt_ms)

    # -- presentations -----------------------------------------------------
    def table(self) -> Any:
        name = self.conv.presentations
        tables = dict(self.nwb.intervals or {})
        if self.nwb.trials is not None:
            tables.setdefault("trials", self.nwb.trials)
        if name not in tables:
            raise NWBImportError(
                f"{self.url}: no presentation table {name!r} (neither /intervals/{name} nor the trials table). "
                f"Tables in this file: {sorted(tables) or 'none'}. Select one with presentations=... "
                "(--presentations NAME).")
        table = tables[name]
        if len(table) == 0:
            raise NWBImportError(f"{self.url}: the presentation table {name!r} is empty; "
                                 "select another with presentations=... (--presentations).")
        return table

    def identities(self, table: Any, starts: np.ndarray) -> np.ndarray:
        """The stimulus identity of every presentation."""
        conv = self.conv
        if conv.stim_index_series is not None:
            series = (self.nwb.stimulus or {}).get(conv.stim_index_series)
            if series is None or type(series).__name__ != "IndexSeries":
                raise NWBImportError(
                    f"{self.url}: no IndexSeries {conv.stim_index_series!r} in /stimulus (it holds: "
                    f"{sorted(self.nwb.stimulus or {}) or 'nothing'}). Fix stim_index_series= "
                    "(--stim-index-series) or take the identity from a column with stim_column= (--stim-column).")
            ts = self._timestamps(series, len(series.data))
            at = np.searchsorted(ts, starts + 1e-9, side="right") - 1
            if (at < 0).any():
                p = int(np.flatnonzero(at < 0)[0])
                raise NWBImportError(f"{self.url}: presentation {p} of {conv.presentations!r} starts at "
                                     f"{starts[p]} s, before the first sample of IndexSeries "
                                     f"{conv.stim_index_series!r} ({ts[0]} s): its stimulus is unknown.")
            return np.asarray(series.data[:])[at]
        cols = list(table.colnames)
        if conv.stim_column is None or conv.stim_column not in cols:
            raise NWBImportError(
                f"{self.url}: the presentation table {conv.presentations!r} has no column {conv.stim_column!r} "
                f"(its columns: {cols}). Name the stimulus column with stim_column= (--stim-column), or give "
                "an IndexSeries with stim_index_series= (--stim-index-series).")
        values = scalar_column(table, conv.stim_column)
        if values is None:
            raise NWBImportError(f"{self.url}: column {conv.stim_column!r} of {conv.presentations!r} does not hold "
                                 "one value per presentation; choose another with stim_column= (--stim-column).")
        return values

    def _timestamps(self, series: Any, n: int) -> np.ndarray:
        if series.timestamps is not None:
            return np.asarray(series.timestamps[:], dtype=np.float64)
        return float(series.starting_time or 0.0) + np.arange(n) / float(series.rate)

    # -- stimuli -------------------------------------------------------------
    def content_series(self, identity: Any) -> Any:
        """The series holding stimulus ``identity`` (a template, or the session-long presented series)."""
        conv = self.conv
        if conv.stim_series is not None:
            for where in ("stimulus", "acquisition"):
                series = (getattr(self.nwb, where) or {}).get(conv.stim_series)
                if series is not None:
                    return series
            raise NWBImportError(f"{self.url}: no series {conv.stim_series!r} in /stimulus or /acquisition "
                                 f"(/stimulus holds: {sorted(self.nwb.stimulus or {}) or 'nothing'}). "
                                 "Fix stim_series= (--stim-series).")
        templates = dict(self.nwb.stimulus_template or {})
        if str(identity) not in templates:
            raise NWBImportError(
                f"{self.url}: stimulus {identity!r} (column {conv.stim_column!r} of {conv.presentations!r}) has "
                f"no series of that name in /stimulus_template (it holds: {sorted(templates)[:10] or 'nothing'}). "
                "Name the templates after the column's values, choose another column with stim_column= "
                "(--stim-column), or cut the stimuli from a series presented over the session with "
                "stim_series= (--stim-series).")
        return templates[str(identity)]

    def indexed_image(self, k: int) -> np.ndarray:
        """Image ``k`` of the ``Images`` (or frame ``k`` of the ``ImageSeries``) the IndexSeries points into."""
        series = self.nwb.stimulus[self.conv.stim_index_series]
        target = series.indexed_images if series.indexed_images is not None else series.indexed_timeseries
        if hasattr(target, "images"):
            order = target.order_of_images
            images = list(order.data) if order is not None else [target.images[n] for n in sorted(target.images)]
            count = len(images)
        else:
            count = 0 if target is None or target.data is None else len(target.data)
        if not 0 <= k < count:
            raise NWBImportError(
                f"{self.url}: IndexSeries {self.conv.stim_index_series!r} points at image {k}, but its target "
                f"holds {count}. Give the stimuli as a column with stim_column= (--stim-column) instead.")
        return np.asarray(images[k].data[:] if hasattr(target, "images") else target.data[k])

    def kind_of(self, series: Any) -> str:
        ndim = len(series.data.shape)
        found = ("video" if type(series).__name__ == "ImageSeries" else
                 "waveform" if ndim == 1 or (ndim == 2 and series.data.shape[1] == 1) else "spectrogram")
        if self.conv.stim_kind not in ("auto", found):
            raise NWBImportError(
                f"{self.url}: stim_kind={self.conv.stim_kind!r} but series {series.name!r} is a "
                f"{type(series).__name__} of shape {tuple(series.data.shape)}, read as {found!r}. "
                "Pass stim_kind='auto' (--stim-kind auto) or the matching kind.")
        if found == "video" and series.data is None:
            raise NWBImportError(f"{self.url}: ImageSeries {series.name!r} stores its frames in external files, "
                                 "which from_nwb does not read.")
        shape = tuple(series.data.shape)
        if shape[0] == 0:
            raise NWBImportError(f"{self.url}: stimulus series {series.name!r} holds no samples (shape {shape}); "
                                 "give the trials a stimulus template with data.")
        if found == "spectrogram" and ndim > 2:
            raise NWBImportError(f"{self.url}: stimulus series {series.name!r} has shape {shape}: a TimeSeries "
                                 "template is read as a waveform (time,) or a spectrogram (time, F); frames go in "
                                 "an ImageSeries. Store the template in one of these forms.")
        return found

    def stimulus(self, series: Any, kind: str, t0: float, n_bins: int) -> torch.Tensor:
        """Stimulus over ``[t0, t0 + n_bins * dt)`` of ``series`` (its own time axis)."""
        t1 = t0 + n_bins * self.dt_s
        if kind == "waveform":
            fs = sample_rate(series)
            first = float(series.timestamps[0]) if series.timestamps is not None else float(series.starting_time or 0)
            j0 = round((t0 - first) * fs)
            n = round((t1 - t0) * fs)
            a, b = min(max(j0, 0), len(series.data)), min(max(j0 + n, 0), len(series.data))
            wave = np.asarray(series.data[a:b], dtype=np.float64).reshape(-1)
            wave = np.pad(wave, (a - j0, n - (a - j0) - len(wave)))
            return log_mel(wave, fs, self.conv.dt_ms, n_bins, self.conv.mel)[None]
        n_frames = len(series.data)
        bounds = self._frame_bounds(series, n_frames)
        i0 = max(0, int(np.searchsorted(bounds, t0, side="right")) - 1)
        i1 = min(n_frames, int(np.searchsorted(bounds, t1, side="left")))
        if i1 <= i0:
            raise NWBImportError(f"{self.url}: series {series.name!r} has no frame in [{t0}, {t1}) s; check its "
                                 "timing (rate / starting_time / timestamps) against the presentation table.")
        frames = np.asarray(series.data[i0:i1])
        fill = 0.0 if kind == "video" else float(frames.min())
        edges = t0 + np.arange(n_bins + 1) * self.dt_s
        out = bin_average(frames, bounds[i0:i1 + 1], edges, fill).astype(np.float32)  # (T, F) or (T, H, W[, C])
        if kind == "spectrogram":
            return torch.from_numpy(np.ascontiguousarray(out.T))[None]
        if out.ndim == 3:
            out = out[..., None]
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, 0, -1).transpose(2, 0, 1, 3)))

    def _frame_bounds(self, series: Any, n: int) -> np.ndarray:
        ts = self._timestamps(series, n)
        step = float(np.median(np.diff(ts))) if n > 1 else (1.0 / float(series.rate) if series.rate else self.dt_s)
        return np.append(ts, ts[-1] + step)

    # -- units -----------------------------------------------------------------
    def units(self) -> tuple[Any, np.ndarray]:
        """The units table and the rows kept by ``unit_filter``."""
        units = self.nwb.units
        if units is None or "spike_times" not in units.colnames:
            raise NWBImportError(f"{self.url}: no units table with spike_times (/units): there are no sorted "
                                 "spikes to bin. from_nwb imports spike-sorted units only.")
        keep = np.ones(len(units), dtype=bool)
        for col, allowed in (self.conv.unit_filter or {}).items():
            values = scalar_column(units, col) if col in units.colnames else None
            if values is None:
                raise NWBImportError(f"{self.url}: the units table has no scalar column {col!r} (its columns: "
                                     f"{list(units.colnames)}). Fix unit_filter= (--unit-filter COLUMN=VALUE).")
            keep &= np.isin(values.astype(str), [str(a) for a in allowed])  # compared as text
        if not keep.any():
            raise NWBImportError(f"{self.url}: no unit left after unit_filter={self.conv.unit_filter}; "
                                 "loosen the filter (--unit-filter).")
        return units, np.flatnonzero(keep)

    def neuron_meta(self, units: Any, rows: np.ndarray) -> list[dict]:
        ids = np.asarray(units.id.data[:])
        columns = {c: v for c in units.colnames if (v := scalar_column(units, c)) is not None}
        electrode_of, electrode_cols = None, {}
        if "electrodes" in units.colnames and units.electrodes.table is not None:
            ends = np.asarray(units.electrodes_index.data[:])
            targets = np.asarray(units.electrodes.data[:])
            starts = np.concatenate([[0], ends[:-1]])
            electrode_of = np.where(ends > starts, targets[np.minimum(starts, len(targets) - 1)], -1)
            table = units.electrodes.table
            electrode_cols = {c: v for c in table.colnames if (v := scalar_column(table, c)) is not None}
        meta = []
        for r in rows.tolist():
            m = {"uid": f"{self.session_id}/unit{ids[r]}", "session_id": self.session_id, "unit_id": ids[r].item()}
            m.update({c: v[r].item() if hasattr(v[r], "item") else v[r] for c, v in columns.items()})
            if electrode_of is not None and electrode_of[r] >= 0:
                e = int(electrode_of[r])
                m.update({f"electrode_{c}": v[e].item() if hasattr(v[e], "item") else v[e]
                          for c, v in electrode_cols.items()})
                if "location" in electrode_cols:
                    m.setdefault("area", m["electrode_location"])
            meta.append(m)
        return meta

    # -- assembly --------------------------------------------------------------
    def dataset(self, identity: dict, *, name: str | None, license: str | None, progress: bool) -> NeuralDataset:
        conv = self.conv
        table = self.table()
        starts = np.asarray(table["start_time"].data[:], dtype=np.float64)
        stops = np.asarray(table["stop_time"].data[:], dtype=np.float64)
        ids = self.identities(table, starts)
        _, first, stim_of = np.unique(ids.astype(str) if ids.dtype.kind == "O" else ids,
                                           return_index=True, return_inverse=True)
        order_of_stims = np.argsort(first, kind="stable")          # stims in order of first presentation
        rank = np.empty_like(order_of_stims)
        rank[order_of_stims] = np.arange(len(order_of_stims))
        stim_of = rank[stim_of.reshape(-1)]
        stim_ids = [ids[first[k]] for k in order_of_stims]
        S = len(stim_ids)
        durations = np.array([np.min(stops[stim_of == s] - starts[stim_of == s]) for s in range(S)])
        n_bins = np.floor(durations / self.dt_s + 1e-9).astype(np.int64) + self.pre_bins + self.post_bins
        if (n_bins <= 0).any():
            s = int(np.flatnonzero(n_bins <= 0)[0])
            raise NWBImportError(f"{self.url}: stimulus {stim_ids[s]!r} lasts {durations[s]} s, less than one "
                                 f"bin of dt_ms={conv.dt_ms}; use a smaller --dt-ms or a pre/post window.")
        # presentations grouped by stim (stable: table order within a stim)
        order = np.argsort(stim_of, kind="stable")
        win_start = starts[order] - self.pre_bins * self.dt_s
        nb = n_bins[stim_of[order]]
        windows = np.stack([win_start, win_start + nb * self.dt_s], axis=1)
        per_stim = np.bincount(stim_of, minlength=S)
        p_off = np.concatenate([[0], np.cumsum(per_stim)])
        v_off = np.concatenate([[0], np.cumsum(per_stim * n_bins)])

        if conv.stim_index_series is not None and conv.stim_series is None:
            series, kind = [], "video"
            stims = [static_video(self.indexed_image(int(k)), int(n_bins[s])) for s, k in enumerate(stim_ids)]
        else:
            series = (self.folder.read_all(stim_ids, self.url) if self.folder is not None
                      else [self.content_series(v) for v in stim_ids])
            kinds = {self.kind_of(s) for s in series}
            if len(kinds) > 1:
                raise NWBImportError(f"{self.url}: the stimuli mix kinds {sorted(kinds)}; a dataset holds one "
                                     "kind. Select the presentations of one kind (--presentations).")
            kind = kinds.pop()
            stims = []
            for s, ser in enumerate(series):
                onset = starts[order[p_off[s]]] if conv.stim_series is not None else float(ser.starting_time or 0.0)
                stims.append(self.stimulus(ser, kind, onset - self.pre_bins * self.dt_s, int(n_bins[s])))

        units, rows = self.units()
        counts, rec = self._bin_units(units, rows, win_start, nb, windows, p_off, v_off, n_bins, progress)

        cls = VideoNeuralDataset if kind == "video" else AudioNeuralDataset
        ds = cls(path=self.url, dt_ms=conv.dt_ms)
        ds.name = name or self.session_id
        if kind == "video":
            ds.H, ds.W = int(stims[0].shape[1]), int(stims[0].shape[2])
        else:
            ds.F = int(stims[0].shape[1])
        ds.stims = stims
        ds.responses = PresentationCounts(counts, rec)
        ds.N_neurons = len(rows)
        ds.nrn_meta = self.neuron_meta(units, rows)
        ds.stim_meta = self.stim_meta(table, stim_ids, stim_of, kind, n_bins)
        resolved: dict[str, Any] = {"stim_kind": kind, "pre_bins": self.pre_bins, "post_bins": self.post_bins}
        if kind == "waveform":
            resolved["mel"] = conv.mel.resolved(sample_rate(series[0]), conv.dt_ms)
        ds.card = self.card(identity, resolved, ds.name, name, license)
        ds.validate()
        return ds

    def _bin_units(self, units: Any, rows: np.ndarray, win_start: np.ndarray, nb: np.ndarray, windows: np.ndarray,
                   p_off: np.ndarray, v_off: np.ndarray, n_bins: np.ndarray,
                   progress: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Counts ``(N, P_s, T_s)`` and recorded ``(P_s, N)`` per stim, one unit at a time."""
        S, N = len(n_bins), len(rows)
        plan = BinPlan(win_start, nb, self.dt_s)
        ends = np.asarray(units.spike_times_index.data[:], dtype=np.int64)
        begins = np.concatenate([[0], ends[:-1]])
        spike_data = units.spike_times.data
        obs = None
        if self.conv.use_obs_intervals and "obs_intervals" in units.colnames:
            o_ends = np.asarray(units.obs_intervals_index.data[:], dtype=np.int64)
            o_data = np.asarray(units.obs_intervals.data[:], dtype=np.float64).reshape(-1, 2)
            obs = (np.concatenate([[0], o_ends[:-1]]), o_ends, o_data)
        dtype = np.dtype(np.uint8)
        counts = [np.zeros((N, p_off[s + 1] - p_off[s], n_bins[s]), dtype=dtype) for s in range(S)]
        rec_all = np.zeros((len(windows), N), dtype=bool)
        for j, r in enumerate(tqdm(rows.tolist(), desc="units", unit="unit", disable=not progress, leave=False)):
            spikes = np.asarray(spike_data[begins[r]:ends[r]], dtype=np.float64)
            if spikes.size > 1 and (np.diff(spikes) < 0).any():
                spikes = np.sort(spikes)
            flat = plan.count(spikes)
            top = int(flat.max()) if flat.size else 0
            if top > np.iinfo(dtype).max:
                dtype = np.min_scalar_type(top)
                counts = [c.astype(dtype) for c in counts]
            for s in range(S):
                counts[s][j] = flat[v_off[s]:v_off[s + 1]].reshape(-1, n_bins[s])
            rec_all[:, j] = recorded(windows, None if obs is None else obs[2][obs[0][r]:obs[1][r]])
        return counts, [rec_all[p_off[s]:p_off[s + 1]] for s in range(S)]

    def stim_meta(self, table: Any, stim_ids: list, stim_of: np.ndarray, kind: str,
                  n_bins: np.ndarray) -> list[dict]:
        """Per stimulus: uid, identity, number of presentations, and the table's columns that are
        constant over its presentations."""
        columns = {c: v for c in table.colnames if c not in ("start_time", "stop_time")
                   and (v := scalar_column(table, c)) is not None}
        meta = []
        for s, ident in enumerate(stim_ids):
            ident = ident.item() if hasattr(ident, "item") else ident
            m = {"uid": f"{self.session_id}/{ident}", "stim": ident, "session_id": self.session_id,
                 "presentation_table": self.conv.presentations, "n_presentations": int((stim_of == s).sum()),
                 "kind": kind, "duration_ms": float(n_bins[s] * self.conv.dt_ms)}
            for c, v in columns.items():
                vals = v[stim_of == s].tolist()
                if all(x == vals[0] for x in vals):
                    m.setdefault(c, vals[0])
            meta.append(m)
        return meta

    def card(self, identity: dict, resolved: dict, name: str, name_arg: str | None, license: str | None) -> dict:
        nwb = self.nwb
        pubs = _strings(nwb.related_publications)
        return {
            "name": name, "license": license, "citation": "; ".join(pubs) or None,
            "description": str(nwb.session_description),
            "lab": None if nwb.lab is None else str(nwb.lab),
            "institution": None if nwb.institution is None else str(nwb.institution),
            "experimenter": _strings(nwb.experimenter),
            "related_publications": pubs, "doi": [p for p in pubs if is_doi(p)],
            "identifier": str(nwb.identifier), "session_id": self.session_id,
            "session_start_time": nwb.session_start_time.isoformat() if nwb.session_start_time else None,
            "source": self.url,
            "nwb_import": {"options": self.conv.as_dict(), "resolved": resolved, "input": identity,
                           "fingerprint": fingerprint(identity, request_options(self.conv, name_arg, license))},
        }


def static_video(image: np.ndarray, n_bins: int) -> torch.Tensor:
    """``(C, H, W, n_bins)``: one image ``(H, W)`` or ``(H, W, C)`` shown for the whole presentation."""
    img = np.asarray(image, dtype=np.float32)
    img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(np.repeat(img[..., None], n_bins, axis=-1)))


def request_options(conv: NWBConversion, name: str | None, license: str | None) -> dict[str, Any]:
    """Everything asked of an import that decides its output (with the input, its fingerprint)."""
    return {**conv.as_dict(), "name": name, "license": license}


def stim_folder(conv: NWBConversion, storage_options: dict | None) -> StimulusFolder | None:
    """The listed stimulus folder of ``conv.stim_dir`` (None without one)."""
    return None if conv.stim_dir is None else StimulusFolder(conv.stim_dir, storage_options, conv.stim_rate)


def session_identity(path_or_url: str | os.PathLike, storage_options: dict | None,
                     folder: StimulusFolder | None) -> dict[str, Any]:
    """What an import reads: the file's identity, plus the stimulus folder's when there is one."""
    identity = input_identity(path_or_url, storage_options)
    return identity if folder is None else {**identity, "stim_dir": folder.identity()}


def import_fingerprint(path_or_url: str | os.PathLike, storage_options: dict | None, conv: NWBConversion,
                       name: str | None = None, license: str | None = None) -> str:
    """The fingerprint an import of ``path_or_url`` records in its card, found without opening the file."""
    identity = session_identity(path_or_url, storage_options, stim_folder(conv, storage_options))
    return fingerprint(identity, request_options(conv, name, license))

