"""Datasets whose stimuli are videos ``(C, H, W, T)``."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import IncompatibleDatasetsError
from ..neural_dataset import DatasetValidationError, NeuralDataset
from . import dense


class VideoNeuralDataset(NeuralDataset):
    """Neural dataset with visual stimuli of frame size ``(H, W)``."""

    def __init__(self, path: str, dt_ms: float):
        super().__init__(path, dt_ms)
        self.H = -1
        self.W = -1

    def get_dt(self) -> float:
        """Bin width in ms."""
        return self.dt

    # -- transforms: the dataset's own, or deepSTRF's dense-tensor forms (a tensor in, a tensor out) --
    def normalize_responses(self, method: Any = "max", *args: Any, **kwargs: Any) -> Any:
        """The dataset's per-neuron normalisation (:meth:`NeuralDataset.normalize_responses`); given a
        dense responses tensor instead, as deepSTRF's video datasets take, that tensor standardised
        along time."""
        if isinstance(method, torch.Tensor):
            return dense.zscore_time(method)
        return super().normalize_responses(method, *args, **kwargs)

    def smooth_responses(self, window_ms: Any = 21.0, sigma_time_step: float = 2, kernel_size: int = 11,
                         padding: int = 5) -> Any:
        """The dataset's Hanning smoothing (:meth:`NeuralDataset.smooth_responses`); given a dense
        ``(N, S, R, T)`` responses tensor instead, as deepSTRF's video datasets take, that tensor
        smoothed with a Gaussian of ``sigma_time_step`` bins."""
        if isinstance(window_ms, torch.Tensor):
            return dense.gaussian_smooth(window_ms, sigma_time_step, kernel_size, padding)
        return super().smooth_responses(window_ms)

    def normalize_videos(self, video_tensor: torch.Tensor) -> torch.Tensor:
        """``video_tensor`` standardised along time."""
        return dense.zscore_time(video_tensor)

    def change_video_temporal_resolution(self, video: torch.Tensor, native_dt: int, target_dt: int):
        """Every ``target_dt // native_dt``-th frame of ``video``, and the new number of frames."""
        return dense.subsample_frames(video, native_dt, target_dt)

    def change_spatial_resolution(self, video_tensor: torch.Tensor, spatial_resol: tuple[int, int]) -> torch.Tensor:
        """Frames of a dense video tensor resized to ``spatial_resol``; ``H`` and ``W`` follow."""
        if tuple(spatial_resol) == (self.H, self.W):
            return video_tensor
        resized = dense.resize_frames(video_tensor, spatial_resol)
        self.H, self.W = (int(x) for x in spatial_resol)
        return resized

    def from_rgb_to_grayscale(self, video_tensor: torch.Tensor) -> torch.Tensor:
        """RGB channels (axis 1) to one luma channel; ``C`` becomes 1."""
        self.C = 1
        return dense.to_grayscale(video_tensor)

    def change_temporal_resolution(self, native_temporal_resolution_video: float, video_tensor: torch.Tensor,
                                   native_temporal_resolution_responses: float, responses_tensor: torch.Tensor,
                                   new_dt: float):
        """Dense videos and responses on bins of ``new_dt`` ms: ``(responses, videos, new_T)``."""
        responses = dense.rebin_time(responses_tensor, native_temporal_resolution_responses, new_dt)
        videos = dense.rebin_time(video_tensor, native_temporal_resolution_video, new_dt)
        return responses, videos, videos.shape[-1]

    def get_responses_signal_power(self, responses_tensor: torch.Tensor) -> torch.Tensor:
        """Signal power ``(N, S)`` of dense responses ``(N, S, R, T)``."""
        return dense.signal_power(responses_tensor)

    def split_into_clips(self, clip_length_frames: int):
        """deepSTRF's legacy layout, dense ``self.responses`` ``(N, S, R, T)`` and ``self.videos``
        ``(S, C, H, W, T)``, cut into clips: ``(responses, videos)``; ``S`` and ``T`` follow."""
        if not (isinstance(self.responses, torch.Tensor) and isinstance(getattr(self, "videos", None), torch.Tensor)):
            raise TypeError("split_into_clips works on deepSTRF's dense layout (self.responses an (N, S, R, T) "
                            "tensor, self.videos (S, C, H, W, T)); this dataset holds lists of cells: cut the dense "
                            "tensors with deepstrf.datasets.video.dense.split_into_clips before filling it")
        responses, videos = dense.split_into_clips(self.responses, self.videos, clip_length_frames)
        self.S, self.T = responses.shape[1], clip_length_frames
        return responses, videos

    def add_noise_to_videos(self, video_tensor: torch.Tensor, noise_level: float = 0.1) -> torch.Tensor:
        """``video_tensor`` plus Gaussian noise of standard deviation ``noise_level``."""
        return dense.add_noise(video_tensor, noise_level)

    def _concat_check_compat(self, other, names=None) -> None:
        super()._concat_check_compat(other, names)
        if not isinstance(other, VideoNeuralDataset):
            return
        a, b = names or (type(self).__name__, type(other).__name__)
        if (self.H, self.W) != (other.H, other.W):
            raise IncompatibleDatasetsError(
                f"frame size mismatch (H, W): {a} has {(self.H, self.W)}, {b} has "
                f"{(other.H, other.W)}. Resize the videos to one frame size first; "
                "nothing is resized automatically.")
        ca, cb = self._frame_channels(), other._frame_channels()
        if ca is not None and cb is not None and ca != cb:
            raise IncompatibleDatasetsError(
                f"channel count mismatch: {a} has C={ca} channels per frame, {b} has C={cb}. Convert the "
                "videos to one channel count first (e.g. to grayscale: ds.stims = "
                "[ds.from_rgb_to_grayscale(x[None])[0] for x in ds.stims]); nothing is converted automatically.")

    def _frame_channels(self) -> int | None:
        """The channel count C of the stimuli ``(C, H, W, T)`` where they are a list of tensors
        (``validate`` keeps it one count), else None: a lazy view is not read for it."""
        first = self.stims[0] if isinstance(self.stims, list) and self.stims else None
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() == 4 else None

    def _concat_copy_attrs(self, source) -> None:
        super()._concat_copy_attrs(source)
        self.H, self.W = source.H, source.W

    def validate(self, *, deep: bool | None = None) -> None:
        super().validate(deep=deep)
        if (self.H, self.W) == (-1, -1) and isinstance(self.stims, list) and self.stims:
            # a deepSTRF subclass need not set them: the frames say what they are
            self.H, self.W = (int(x) for x in self.stims[0].shape[-3:-1])
        for name in ("H", "W"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise DatasetValidationError(f"self.{name} must be a positive int (got {v!r})")
        self._validate_channels()

    def _validate_channels(self) -> None:
        """Refuse a list of ``(C, H, W, T)`` stimuli with more than one channel count C (a batch of
        them could not be stacked)."""
        C = self._frame_channels()
        for s, x in enumerate(self.stims if C is not None else ()):
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] != C:
                raise DatasetValidationError(
                    f"stims[{s}] has C={x.shape[0]} channels, stims[0] C={C}: give every stimulus one channel "
                    "count (e.g. to grayscale: ds.stims = [ds.from_rgb_to_grayscale(x[None])[0] for x in ds.stims])")
