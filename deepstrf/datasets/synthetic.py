"""Synthetic linear-nonlinear-Poisson sources with known receptive fields.

Used by the tests, the benchmarks and the demo. Presets are shaped like the
public CRCNS AA1, AA2 and NS1 sets. Responses are generated on access, one
stimulus row at a time, deterministically from ``(seed, stim)``: a synthetic
source costs memory for its parameters only, until ``to_memory()``
materialises it the way a deepSTRF loader would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .audio import AudioNeuralDataset
from .views import LazySequence, ResponseGrid, missing_sentinel


@dataclass(frozen=True)
class SourceSpec:
    """Shape of a synthetic source."""

    name: str
    n_stims: int
    n_neurons: int
    F: int
    dt_ms: float
    T_range: tuple[int, int]
    repeats: int
    coverage: float
    species: str
    areas: tuple[str, ...]
    rate_hz: float = 30.0
    strf_ms: float = 60.0


PRESETS: dict[str, SourceSpec] = {
    "aa1": SourceSpec("AA1", 30, 100, 32, 1.0, (1800, 2200), 10, 0.92, "zebra finch", ("MLd", "Field_L")),
    "aa2": SourceSpec("AA2", 117, 494, 32, 1.0, (1800, 2200), 10, 0.85, "zebra finch", ("MLd", "OV", "CM")),
    "ns1": SourceSpec("NS1", 20, 119, 34, 5.0, (999, 999), 20, 1.0, "ferret", ("A1", "PEG")),
}

STIM_TYPES = ("conspecific", "flatrip", "songrip")


def scaled_spec(preset: str | SourceSpec, scale: float = 1.0, time_scale: float = 1.0) -> SourceSpec:
    """A preset with S and N multiplied by ``scale`` and T by ``time_scale`` (at least 2 each)."""
    spec = PRESETS[preset.lower()] if isinstance(preset, str) else preset
    lo, hi = spec.T_range
    return replace(spec,
                   n_stims=max(2, round(spec.n_stims * scale)),
                   n_neurons=max(2, round(spec.n_neurons * scale)),
                   T_range=(max(8, round(lo * time_scale)), max(8, round(hi * time_scale))))


class SyntheticAudioDataset(AudioNeuralDataset):
    """LN-Poisson auditory source with ground truth in :attr:`ground_truth`.

    ``SyntheticAudioDataset("aa1", scale=0.1, seed=3)`` gives 3 stims x 10
    neurons shaped like CRCNS AA1. ``true_rate(s)`` is the noiseless
    expected count per bin of every neuron for stim ``s``.
    """

    def __init__(self, preset: str | SourceSpec = "aa1", *, scale: float = 1.0, time_scale: float = 1.0,
                 seed: int = 0, path: str | None = None):
        spec = scaled_spec(preset, scale, time_scale)
        super().__init__(path or f"synthetic://{spec.name.lower()}?seed={seed}", spec.dt_ms)
        self.spec = spec
        self.seed = seed
        self.name = spec.name
        self.F = spec.F
        rng = np.random.default_rng([seed, 0])
        S, N = spec.n_stims, spec.n_neurons
        self.lengths = rng.integers(spec.T_range[0], spec.T_range[1] + 1, size=S)
        self.stim_meta = [{"uid": f"{spec.name}-{seed}-stim{s:04d}", "type": STIM_TYPES[s % len(STIM_TYPES)],
                           "duration_ms": float(self.lengths[s] * spec.dt_ms)} for s in range(S)]
        self.nrn_meta = [{"uid": f"{spec.name}-{seed}-nrn{n:04d}", "area": spec.areas[n % len(spec.areas)],
                          "species": spec.species} for n in range(N)]
        self.N_neurons = N
        self.recorded = _coverage(rng, S, N, spec.coverage)
        self.cell_repeats = np.where(self.recorded, rng.integers(max(2, spec.repeats - 2), spec.repeats + 1,
                                                                 size=(S, N)), 0)
        self.ground_truth = _receptive_fields(rng, N, spec)
        self.card = {"name": spec.name, "license": "CC0-1.0", "citation": "synthetic (deepstrf)",
                     "description": f"Synthetic LN-Poisson source shaped like {spec.name}, seed {seed}."}
        self.stims = _SyntheticStims(self)
        self.responses = _SyntheticResponses(self)
        self.validate()

    def stim(self, s: int) -> torch.Tensor:
        """Spectrogram-like stimulus ``(1, F, T_s)``, standardised, deterministic in ``(seed, s)``."""
        rng = np.random.default_rng([self.seed, 1, s])
        T = int(self.lengths[s])
        x = rng.standard_normal((self.F, T + 64))
        # smooth in time (~10 ms) and frequency, then gate by syllable-like envelopes
        kt = np.hanning(max(3, round(10 / self.dt) | 1))
        x = np.apply_along_axis(lambda v: np.convolve(v, kt / kt.sum(), mode="same"), 1, x)[:, 32:32 + T]
        kf = np.array([0.25, 0.5, 0.25])
        x = np.apply_along_axis(lambda v: np.convolve(v, kf, mode="same"), 0, x)
        env = np.convolve(rng.random(T) < 0.01, np.ones(max(2, round(80 / self.dt))), mode="full")[:T] > 0
        x = x * (0.3 + env)
        x = (x - x.mean()) / (x.std() + 1e-8)
        return torch.from_numpy(x.astype(np.float32))[None]

    def true_rate(self, s: int) -> torch.Tensor:
        """Expected spike count per bin, ``(N, T_s)``, for every neuron.

        Computed with numpy, not torch: it runs in DataLoader workers, where torch's BLAS (MKL)
        may hold a lock copied half-way from a trainer's thread at fork (``docs/streaming.md``).
        """
        gt = self.ground_truth
        x = self.stim(s)[0].numpy()  # (F, T)
        strf = gt["strf"].numpy()    # (N, F, L)
        N, n_bands, L = strf.shape
        T = x.shape[1]
        # causal: drive[n, t] = sum_{f, l} strf[n, f, l] * x[f, t - l], as one matrix product
        padded = np.concatenate([np.zeros((n_bands, L - 1), dtype=x.dtype), x], axis=1)
        lagged = np.lib.stride_tricks.sliding_window_view(padded, L, axis=1)[:, :, ::-1]  # (F, T, L): x[f, t - l]
        drive = strf.reshape(N, -1) @ lagged.transpose(0, 2, 1).reshape(n_bands * L, T)
        z = drive + gt["bias"].numpy()[:, None]
        rate_hz = gt["peak_hz"].numpy()[:, None] * np.logaddexp(0.0, z, dtype=np.float32)
        return torch.from_numpy(rate_hz * np.float32(self.dt / 1000.0))

    def counts(self, s: int) -> list[torch.Tensor]:
        """Poisson counts of row ``s``: one ``(R, T)`` float tensor or sentinel per neuron."""
        rate = self.true_rate(s).numpy()
        R = int(self.cell_repeats[s].max())
        rng = np.random.default_rng([self.seed, 2, s])
        draws = rng.poisson(rate[:, None, :], size=(self.N_neurons, max(R, 1), rate.shape[1]))
        return [torch.from_numpy(draws[n, :r].astype(np.float32)) if r else missing_sentinel()
                for n, r in enumerate(self.cell_repeats[s].tolist())]


class _SyntheticStims(LazySequence):
    def __init__(self, ds: SyntheticAudioDataset) -> None:
        super().__init__(ds.spec.n_stims)
        self.ds = ds

    def _get(self, i: int) -> torch.Tensor:
        return self.ds.stim(i)


class _SyntheticResponses(ResponseGrid):
    """Rows generated on demand; the last row is cached for cell-by-cell access."""

    def __init__(self, ds: SyntheticAudioDataset) -> None:
        super().__init__(ds.spec.n_stims, ds.spec.n_neurons)
        self.ds = ds
        self._cached: tuple[int, list[torch.Tensor]] | None = None

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        if self._cached is None or self._cached[0] != s:
            self._cached = (s, self.ds.counts(s))
        row = self._cached[1]
        return [row[n] for n in neurons]

    def _mask(self) -> torch.Tensor:
        return torch.from_numpy(self.ds.recorded.copy())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}


def _coverage(rng: np.random.Generator, S: int, N: int, fraction: float) -> np.ndarray:
    """Recorded (stim, neuron) pairs: every stim and every neuron has at least one."""
    cov = rng.random((S, N)) < fraction
    cov[rng.integers(0, S, size=N), np.arange(N)] = True
    cov[np.arange(S), rng.integers(0, N, size=S)] = True
    return cov


def _receptive_fields(rng: np.random.Generator, N: int, spec: SourceSpec) -> dict[str, torch.Tensor]:
    """Gabor-like spectro-temporal receptive fields, one per neuron."""
    L = max(4, round(spec.strf_ms / spec.dt_ms))
    f = np.arange(spec.F)[None, :, None]
    t = np.arange(L)[None, None, :] * spec.dt_ms
    bf = rng.uniform(0.15, 0.85, size=(N, 1, 1)) * spec.F
    bw = rng.uniform(1.5, 4.0, size=(N, 1, 1))
    latency = rng.uniform(8.0, 20.0, size=(N, 1, 1))
    width = rng.uniform(6.0, 14.0, size=(N, 1, 1))
    temporal = np.exp(-0.5 * ((t - latency) / width) ** 2) * np.cos(2 * math.pi * (t - latency) / (4 * width))
    spectral = np.exp(-0.5 * ((f - bf) / bw) ** 2) - 0.4 * np.exp(-0.5 * ((f - bf) / (2.5 * bw)) ** 2)
    strf = spectral * temporal
    strf /= np.sqrt((strf ** 2).sum(axis=(1, 2), keepdims=True))
    return {
        "strf": torch.from_numpy((strf * 1.5).astype(np.float32)),
        "bias": torch.from_numpy(rng.uniform(-2.0, -1.0, size=N).astype(np.float32)),
        "peak_hz": torch.from_numpy(rng.uniform(0.5, 1.5, size=N).astype(np.float32) * spec.rate_hz),
    }
