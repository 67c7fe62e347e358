"""Waveform -> log-mel spectrogram, one frame per response bin (deterministic, documented).

The transform (``docs/format.md``, "NWB import"):

1. hop = ``fs * dt_ms / 1000`` samples. When that is not an integer, the waveform is first linearly
   interpolated to ``fs' = round(hop) * 1000 / dt_ms`` (less than half a sample per bin of change),
   so that frame ``t`` stays centred on the centre of response bin ``t`` over the whole stimulus.
2. ``torch.stft`` with a periodic Hann window of ``window_ms`` (``n_fft`` = the next power of two),
   ``center=False`` on the waveform zero-padded so that frame ``t`` is centred on sample
   ``(t + 0.5) * hop``; power ``|X|^2``.
3. ``bands`` triangular filters equally spaced on the HTK mel scale (``2595 log10(1 + f / 700)``)
   between ``f_min`` and ``f_max`` (default: half the (resampled) rate), unnormalised.
4. ``log(mel + eps)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import NWBImportError


@dataclass(frozen=True)
class MelSpec:
    """The parameters of the waveform transform (recorded in the store's metadata)."""

    bands: int = 32
    f_min: float = 50.0
    f_max: float | None = None
    window_ms: float = 25.0
    eps: float = 1e-10

    def resolved(self, fs: float, dt_ms: float) -> dict:
        """The parameters with everything derived from ``fs`` and ``dt_ms`` filled in."""
        hop = max(1, round(fs * dt_ms / 1000.0))
        fs_used = hop * 1000.0 / dt_ms
        win = max(hop, round(self.window_ms * fs_used / 1000.0))
        return {**asdict(self), "transform": "log-mel (HTK mel, Hann window, torch.stft)",
                "f_max": float(self.f_max or fs_used / 2), "fs": float(fs), "fs_resampled": fs_used,
                "hop_samples": hop, "win_samples": win, "n_fft": 1 << (win - 1).bit_length()}


def mel_filterbank(bands: int, n_fft: int, fs: float, f_min: float, f_max: float) -> np.ndarray:
    """``(bands, n_fft // 2 + 1)`` triangular HTK-mel filters."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    edges_hz = 700.0 * (10 ** (np.linspace(mel(f_min), mel(f_max), bands + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, fs / 2, n_fft // 2 + 1)
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


def log_mel(wave: np.ndarray, fs: float, dt_ms: float, n_bins: int, spec: MelSpec) -> torch.Tensor:
    """``(bands, n_bins)`` log-mel spectrogram of a 1-D waveform; bin ``t`` covers
    ``[t * dt_ms, (t + 1) * dt_ms)`` of the waveform (zeros past its end)."""
    p = spec.resolved(fs, dt_ms)
    if p["f_max"] > p["fs_resampled"] / 2 or not 0 <= spec.f_min < p["f_max"]:
        raise NWBImportError(f"mel bands: need 0 <= f_min < f_max <= fs/2, got f_min={spec.f_min}, "
                             f"f_max={p['f_max']}, fs={fs}. Pass other f_min / f_max (--f-min / --f-max).")
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if p["fs_resampled"] != fs:
        t_new = np.arange(math.ceil(len(wave) * p["fs_resampled"] / fs)) / p["fs_resampled"]
        wave = np.interp(t_new, np.arange(len(wave)) / fs, wave)
    hop, win, n_fft = p["hop_samples"], p["win_samples"], p["n_fft"]
    need = n_bins * hop
    wave = np.pad(wave[:need], (0, max(0, need - len(wave))))
    left = n_fft // 2 - hop // 2
    right = (n_bins - 1) * hop + n_fft - left - need
    x = torch.from_numpy(np.pad(wave, (left, max(0, right))).astype(np.float32))
    X = torch.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win),
                   center=False, return_complex=True)[:, :n_bins]
    fb = torch.from_numpy(mel_filterbank(spec.bands, n_fft, p["fs_resampled"], spec.f_min, p["f_max"]))
    return torch.log(fb @ X.abs().square() + spec.eps)
