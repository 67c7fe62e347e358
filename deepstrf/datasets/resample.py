"""Opt-in conversions that make datasets poolable: re-binning and band resampling.

Concatenation refuses datasets with different ``dt_ms`` or ``F``; these
helpers convert one explicitly, returning a **new** dataset (the source is
never modified) whose data is converted on read:

- :func:`rebin_dataset` sums spike counts over ``k`` consecutive bins to a
  coarser ``dt_ms = k * dt`` (exact, counts stay counts) and averages the
  stimulus frames over the same bins;
- :func:`resample_frequency` interpolates spectrograms linearly along the
  frequency axis to another number of bands.

Both are lazy: a store-backed input stays store-backed (batched raw reads
are re-binned in their stored integer dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import views
from .audio import AudioNeuralDataset
from .concat import concat_datasets, plain_concat_parts
from .neural_dataset import NeuralDataset
from .video import VideoNeuralDataset


# -- re-binning -----------------------------------------------------------------
def rebin_counts(cell: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum an ``(R, T)`` cell over ``factor`` consecutive bins -> ``(R, T // factor)``.

    A trailing partial bin (``T % factor`` bins) is dropped: only whole
    coarse bins are exact. The missing sentinel is returned unchanged.
    """
    if views.is_missing(cell):
        return cell
    R, T = cell.shape
    Tk = T // factor
    if Tk == 0:
        raise ValueError(f"a response of {T} bins is shorter than one re-binned bin ({factor} bins)")
    return cell[:, :Tk * factor].reshape(R, Tk, factor).sum(dim=-1, dtype=_sum_dtype(cell.dtype))


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.int64


class _FrameAverager:
    """Average stimulus frames over ``factor`` bins along the last (time) axis (picklable)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        k = self.factor
        Tk = x.shape[-1] // k
        if Tk == 0:
            raise ValueError(f"stim {i} has {x.shape[-1]} frames, fewer than one re-binned bin ({k})")
        y = x[..., :Tk * k].reshape(*x.shape[:-1], Tk, k)
        return y.mean(dim=-1) if y.is_floating_point() else y.float().mean(dim=-1)


class _WaveformCropper:
    """Crop a waveform ``(1, T_audio)`` to whole re-binned bins of ``hop`` samples, as the responses
    drop their trailing partial bin (picklable)."""

    def __init__(self, hop: int) -> None:
        self.hop = hop

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        bins = x.shape[-1] // self.hop
        if bins == 0:
            raise ValueError(f"waveform stim {i} has {x.shape[-1]} samples, fewer than one re-binned bin ({self.hop})")
        return x[..., :bins * self.hop]


class RebinnedGrid(views.ResponseGrid):
    """A response grid read from ``source`` with every valid cell re-binned by ``factor``."""

    def __init__(self, source: NeuralDataset, factor: int) -> None:
        super().__init__(source.get_S(), source.N_neurons)
        self.source = source.responses
        self.source_mask = source.nrn_masks
        self.factor = factor

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        return [rebin_counts(c, self.factor) for c in views.read_row(self.source, s, neurons)]

    def _stored_signature(self) -> str | None:
        source = views.content_signature(self.source)
        return None if source is None else f"{source}|rebin(factor={self.factor})"

    def _mask(self) -> torch.Tensor:
        return self.source_mask.clone()

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[views.RawRow]:
        """The source's batched raw reads, re-binned in their stored dtype."""
        k = self.factor
        rows = []
        for row in views.read_raw_rows(self.source, stims, neurons):
            cells, lengths = [], []
            for (r, t), cell in zip(zip(row.repeats.tolist(), row.lengths.tolist()), row.cells()):
                tk = t // k
                if tk == 0:
                    raise ValueError(f"stim {row.stim}: a response of {t} bins is shorter than one "
                                     f"re-binned bin ({k} bins)")
                dtype = cell.dtype if cell.dtype.kind == "f" else np.int64
                cells.append(cell[:, :tk * k].reshape(r, tk, k).sum(axis=-1, dtype=dtype).reshape(-1))
                lengths.append(tk)
            values = np.concatenate(cells) if cells else row.values
            rows.append(views.RawRow(row.stim, row.neurons, row.repeats, np.asarray(lengths, dtype=np.int64)
                                     if cells else row.lengths, values))
        return views.fill_rows(rows, out)


def rebin_dataset(ds: NeuralDataset, dt_ms: float) -> NeuralDataset:
    """A new dataset with bins of ``dt_ms``, an integer multiple of ``ds.dt_ms``.

    Spike counts are summed over each group of ``k = dt_ms / ds.dt_ms``
    bins (exact; integer counts stay integers), spectrogram/video frames are
    averaged over the same bins; a trailing partial bin is dropped. In
    waveform mode (``audio_fs`` set) the waveforms keep their samples (``hop``
    follows ``dt_ms``), cropped where the responses drop a partial bin.
    Metadata, selections, ``F``/``H``/``W`` and ``return_waveform`` are
    carried over; a pool is re-binned source by source and stays a pool.

    Raises ``ValueError`` if ``dt_ms`` is not ``k * ds.dt_ms`` for an integer ``k >= 1``.
    """
    factor = _rebin_factor(ds, dt_ms)
    parts = plain_concat_parts(ds)
    if parts is not None:
        return _repool([rebin_dataset(p, dt_ms) for p in parts], ds)
    waveform = getattr(ds, "audio_fs", None) is not None
    if factor == 1:
        stims = _PassThrough(ds.stims)
    else:
        crop = _WaveformCropper(ds.hop * factor) if waveform else _FrameAverager(factor)
        stims = views.MappedSequence(ds.stims, crop)
    out = _derived(ds, stims, RebinnedGrid(ds, factor), f"#dt_ms={dt_ms:g}")
    out.dt = float(dt_ms)
    out.resampling = [*getattr(ds, "resampling", []), {"op": "rebin", "from_dt_ms": ds.dt, "dt_ms": out.dt,
                                                       "factor": factor}]
    return out


def _rebin_factor(ds: NeuralDataset, dt_ms: float) -> int:
    if not isinstance(ds, NeuralDataset):
        raise TypeError(f"rebin_dataset expects a NeuralDataset, got {type(ds).__name__}")
    if isinstance(dt_ms, bool) or not isinstance(dt_ms, (int, float)) or not dt_ms > 0:
        raise ValueError(f"rebin_dataset: dt_ms must be a positive number, got {dt_ms!r}")
    ratio = dt_ms / ds.dt
    k = round(ratio)
    if k < 1 or not math.isclose(ratio, k, rel_tol=1e-9, abs_tol=1e-9):
        name = getattr(ds, "name", None) or type(ds).__name__
        lo, hi = max(1, math.floor(ratio)), max(1, math.ceil(ratio))
        raise ValueError(
            f"rebin_dataset: {name} has dt_ms={ds.dt}; cannot re-bin to dt_ms={dt_ms} "
            f"(ratio {ratio:.6g} is not an integer >= 1). Spike counts can only be summed over whole "
            f"bins: choose an integer multiple of {ds.dt} ms, e.g. {lo * ds.dt:g} or {hi * ds.dt:g} ms.")
    return k


# -- frequency resampling ------------------------------------------------------------
class _BandInterpolator:
    """Linear interpolation of ``(..., F, T)`` to ``n_bands`` along F, end bands aligned (picklable)."""

    def __init__(self, n_bands: int) -> None:
        self.n_bands = n_bands

    def __call__(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return interpolate_bands(x, self.n_bands)


def interpolate_bands(x: torch.Tensor, n_bands: int) -> torch.Tensor:
    """Resample ``x`` ``(..., F, T)`` to ``(..., n_bands, T)`` by linear interpolation along F.

    The first and last bands map onto each other (``align_corners=True``):
    the converted spectrogram spans the same frequency range.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a spectrogram (..., F, T), got shape {tuple(x.shape)}")
    if x.shape[-2] == n_bands:
        return x
    lead, (Fo, T) = x.shape[:-2], x.shape[-2:]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    y = x.to(dtype).reshape(-1, Fo, T).transpose(1, 2)  # (M, T, F): interpolate the last axis
    if Fo == 1:
        y = y.expand(-1, -1, n_bands)
    else:
        y = F.interpolate(y, size=n_bands, mode="linear", align_corners=True)
    return y.transpose(1, 2).reshape(*lead, n_bands, T).contiguous()


def resample_frequency(ds: AudioNeuralDataset, F: int) -> AudioNeuralDataset:  # noqa: N803 - deepSTRF name
    """A new audio dataset whose spectrograms have ``F`` bands (linear interpolation).

    Responses, metadata, ``dt_ms`` and selections are unchanged; band 0 and
    band ``F - 1`` keep the frequencies of the original first and last bands.
    Raises ``TypeError`` for a non-audio dataset and ``ValueError`` for
    waveform-mode data (``audio_fs`` set) or a non-positive ``F``.
    """
    if not isinstance(ds, AudioNeuralDataset):
        raise TypeError(f"resample_frequency needs an AudioNeuralDataset with spectrogram stims, "
                        f"got {type(ds).__name__}")
    if isinstance(F, bool) or not isinstance(F, int) or F < 1:
        raise ValueError(f"resample_frequency: F must be a positive int, got {F!r}")
    if ds.audio_fs is not None:
        raise ValueError(f"resample_frequency: {getattr(ds, 'name', None) or type(ds).__name__} holds "
                         f"waveforms (audio_fs={ds.audio_fs}), not spectrograms; compute spectrograms first")
    parts = plain_concat_parts(ds)
    if parts is not None:
        return _repool([resample_frequency(p, F) for p in parts], ds)
    out = _derived(ds, views.MappedSequence(ds.stims, _BandInterpolator(F)), _PassThroughGrid(ds), f"#F={F}")
    out.F = F
    out.resampling = [*getattr(ds, "resampling", []), {"op": "resample_frequency", "from_F": ds.F, "F": F}]
    out.validate()
    return out


# -- shared plumbing -------------------------------------------------------------------
class _PassThrough(views.LazySequence):
    """Read-through view, so edits to the new dataset never reach the source."""

    def __init__(self, base: Sequence) -> None:
        super().__init__(len(base))
        self.base = base

    def _get(self, i: int):
        return self.base[i]

    def _get_many(self, indices: Sequence[int]) -> list:
        return views.read_many(self.base, indices)


class _PassThroughGrid(views.ResponseGrid):
    """Read-through view of a source's responses (copy-on-write overrides stay local)."""

    def __init__(self, source: NeuralDataset) -> None:
        super().__init__(source.get_S(), source.N_neurons)
        self.source = source.responses
        self.source_mask = source.nrn_masks

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        return views.read_row(self.source, s, neurons)

    def _stored_signature(self) -> str | None:
        return views.content_signature(self.source)

    def _mask(self) -> torch.Tensor:
        return self.source_mask.clone()

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[views.RawRow]:
        return views.read_raw_rows(self.source, stims, neurons, out)

    def _row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None) -> tuple[np.ndarray, np.dtype] | None:
        return views.raw_row_sizes(self.source, stims, neurons)


def _generic_class(ds: NeuralDataset) -> type:
    """The data-model class of ``ds`` (loader subclasses' extra methods may no longer hold)."""
    for cls in (AudioNeuralDataset, VideoNeuralDataset):
        if isinstance(ds, cls):
            return cls
    return NeuralDataset


def _derived(ds: NeuralDataset, stims, responses, suffix: str) -> NeuralDataset:
    cls = _generic_class(ds)
    out = cls.__new__(cls)
    cls.__init__(out, path=f"{ds.path}{suffix}", dt_ms=ds.dt)
    out._concat_copy_attrs(ds)
    out.stims = stims
    out.responses = responses
    out.stim_meta = [dict(m) for m in ds.stim_meta]
    out.nrn_meta = [dict(m) for m in ds.nrn_meta]
    out.N_neurons = ds.N_neurons
    for attr in ("name", "card"):
        if getattr(ds, attr, None) is not None:
            setattr(out, attr, getattr(ds, attr))
    out.I = list(ds.I)
    out.S_sel = None if ds.S_sel is None else list(ds.S_sel)
    out.validate(deep=False)
    return out


def _repool(parts: list[NeuralDataset], ds: NeuralDataset) -> NeuralDataset:
    out = concat_datasets(parts, names=list(ds.source_names))
    out.I = list(ds.I)
    out.S_sel = None if ds.S_sel is None else list(ds.S_sel)
    return out
