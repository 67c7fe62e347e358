"""Small in-memory datasets built the way deepSTRF loaders fill them (plain lists)."""

from __future__ import annotations

import torch

from deepstrf.datasets import NeuralDataset
from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.video import VideoNeuralDataset

NAN = float("nan")


def fill(ds: NeuralDataset, seed: int, S: int, N: int, stim_shape: tuple, prefix: str) -> NeuralDataset:
    """Random ragged responses: T varies per stim, R per cell; every 4th pair missing."""
    g = torch.Generator().manual_seed(seed)
    lengths = [12 + 3 * s for s in range(S)]
    ds.stims = [torch.randn(*stim_shape, T, generator=g) for T in lengths]
    ds.responses = [[torch.poisson(torch.rand(2 + (s + n) % 3, T, generator=g) * 2, generator=g)
                     if (s + n + seed) % 4 else torch.full((1, 1), NAN)
                     for n in range(N)] for s, T in enumerate(lengths)]
    ds.stim_meta = [{"uid": f"{prefix}-s{s}", "type": ("song", "rip")[s % 2]} for s in range(S)]
    ds.nrn_meta = [{"uid": f"{prefix}-n{n}", "area": ("MLd", "L")[n % 2]} for n in range(N)]
    ds.N_neurons = N
    ds.validate()
    return ds


def audio_init(self, seed: int = 0, S: int = 4, N: int = 5, F: int = 8, dt_ms: float = 1.0):
    AudioNeuralDataset.__init__(self, path=f"toy-audio-{seed}", dt_ms=dt_ms)
    self.F = F
    fill(self, seed, S, N, (1, F), f"a{seed}")


class ToyAudio(AudioNeuralDataset):
    __init__ = audio_init


class OtherAudio(AudioNeuralDataset):
    """A sibling class of ToyAudio: their common ancestor is AudioNeuralDataset."""

    __init__ = audio_init


class ToyVideo(VideoNeuralDataset):
    def __init__(self, seed: int = 0, S: int = 3, N: int = 4, H: int = 6, W: int = 5, dt_ms: float = 1.0):
        super().__init__(path=f"toy-video-{seed}", dt_ms=dt_ms)
        self.H, self.W = H, W
        fill(self, seed, S, N, (1, H, W), f"v{seed}")


def cells_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(torch.nan_to_num(a, 7.5), torch.nan_to_num(b, 7.5)))
