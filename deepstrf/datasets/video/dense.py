"""deepSTRF's helpers for videos and responses held as dense tensors.

Video datasets written for deepSTRF sometimes keep their data as dense tensors,
videos ``(S, C, H, W, T)`` (or ``(N, S, C, H, W, T)``) and responses
``(N, S, R, T)``, and transform them with these functions before filling the
dataset. :class:`~deepstrf.datasets.video.VideoNeuralDataset` offers them under
deepSTRF's method names; they take and return tensors and leave the dataset's
``stims`` and ``responses`` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R BT.601 luma, as deepSTRF uses


def zscore_time(x: torch.Tensor) -> torch.Tensor:
    """``x`` standardised along its last (time) axis."""
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + EPS)


def gaussian_smooth(responses: torch.Tensor, sigma_time_step: float = 2, kernel_size: int = 11,
                    padding: int = 5) -> torch.Tensor:
    """Responses ``(N, S, R, T)`` convolved along time with a normalised Gaussian of
    ``sigma_time_step`` bins (``kernel_size`` taps, ``padding`` zeros on each side)."""
    n, s, r, t = responses.shape
    taps = torch.linspace(-(kernel_size // 2), kernel_size // 2, kernel_size)
    kernel = torch.exp(-0.5 * (taps / sigma_time_step) ** 2)
    kernel = (kernel / kernel.sum()).to(responses.dtype).view(1, 1, -1)
    flat = responses.reshape(n * s * r, 1, t)
    return F.conv1d(flat, kernel, padding=padding).reshape(n, s, r, -1)


def subsample_frames(video: torch.Tensor, native_dt: int, target_dt: int) -> tuple[torch.Tensor, int]:
    """Every ``target_dt // native_dt``-th frame of ``video`` and the new number of frames."""
    if target_dt % native_dt:
        raise ValueError(f"target_dt ({target_dt}) must be a whole multiple of native_dt ({native_dt})")
    video = video[..., ::target_dt // native_dt]
    return video, video.shape[-1]


def resize_frames(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``video`` ``(S, C, H, W, T)`` or ``(N, S, C, H, W, T)`` with frames resized to ``size``
    (bilinear, antialiased)."""
    if video.dim() not in (5, 6):
        raise ValueError(f"expected a (S, C, H, W, T) or (N, S, C, H, W, T) video tensor, got {tuple(video.shape)}")
    *lead, c, h, w, t = video.shape
    frames = video.movedim(-1, -4).reshape(-1, c, h, w)  # (... T, C, H, W) flattened
    frames = F.interpolate(frames, size=tuple(size), mode="bilinear", antialias=True)
    return frames.reshape(*lead, t, c, *size).movedim(-4, -1)


def to_grayscale(video: torch.Tensor) -> torch.Tensor:
    """RGB on axis 1 weighted into one channel (kept as axis 1)."""
    r, g, b = video.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def rebin_time(x: torch.Tensor, native_dt: float, new_dt: float) -> torch.Tensor:
    """``x`` on bins of ``new_dt``: summed over whole groups of bins when coarser, each bin repeated
    when finer (counts keep their totals only when coarser)."""
    if new_dt > native_dt:
        factor = int(new_dt / native_dt)
        return x.reshape(*x.shape[:-1], -1, factor).sum(dim=-1)
    if new_dt < native_dt:
        return torch.repeat_interleave(x, int(native_dt / new_dt), dim=-1)
    return x


def signal_power(responses: torch.Tensor) -> torch.Tensor:
    """Signal power ``(N, S)`` of responses ``(N, S, R, T)`` (Sahani & Linden 2003): the variance of the
    summed repeats less the summed variances of the repeats, over ``R (R - 1)``."""
    repeats = responses.shape[-2]
    total = responses.sum(dim=-2).var(dim=-1)
    noise = responses.var(dim=-1).sum(dim=-1)
    return (total - noise) / (repeats * (repeats - 1))


def add_noise(video: torch.Tensor, noise_level: float = 0.1) -> torch.Tensor:
    """``video`` plus Gaussian noise of standard deviation ``noise_level``."""
    return video + torch.randn_like(video) * noise_level


def split_into_clips(responses: torch.Tensor, videos: torch.Tensor,
                     clip_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses ``(N, S, R, T)`` and videos ``(S, C, H, W, T)`` cut along time into clips of
    ``clip_length`` bins, the last zero-padded: ``(N, S * n_clips, R, clip_length)`` and
    ``(S * n_clips, C, H, W, clip_length)``, clip-major (every sequence's first clip, then the second)."""
    def clips(x: torch.Tensor) -> torch.Tensor:
        short = -x.shape[-1] % clip_length
        x = F.pad(x, (0, short))
        return torch.stack(x.split(clip_length, dim=-1))  # (n_clips, ...)

    per_clip = clips(responses).movedim(0, 1)  # (N, n_clips, S, R, L)
    n, k, s, r, length = per_clip.shape
    frames = clips(videos)  # (n_clips, S, C, H, W, L)
    return per_clip.reshape(n, k * s, r, length), frames.reshape(-1, *frames.shape[2:])
