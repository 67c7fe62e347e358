"""Datasets whose stimuli are spectrograms ``(C, F, T)`` (or mono waveforms)."""

from __future__ import annotations

from ...errors import IncompatibleDatasetsError
from ..neural_dataset import DatasetValidationError, NeuralDataset
from ..views import is_missing


class AudioNeuralDataset(NeuralDataset):
    """Neural dataset with auditory stimuli.

    ``F`` is the number of frequency bands of the spectrograms; ``audio_fs``
    is the waveform sample rate in waveform mode and ``None`` otherwise.
    """

    def __init__(self, path: str, dt_ms: float):
        super().__init__(path, dt_ms)
        self.F = -1
        self.audio_fs: int | None = None
        self.hearing_range_hz: tuple | None = None

    def get_F(self) -> int:
        """Number of frequency bands."""
        return self.F

    @property
    def hop(self) -> int | None:
        """Audio samples per response bin in waveform mode, else ``None``."""
        if self.audio_fs is None:
            return None
        return int(round(self.audio_fs * self.dt / 1000.0))

    def _concat_check_compat(self, other, names=None) -> None:
        super()._concat_check_compat(other, names)
        if not isinstance(other, AudioNeuralDataset):
            return
        a, b = names or (type(self).__name__, type(other).__name__)
        if self.F != other.F:
            raise IncompatibleDatasetsError(
                f"F mismatch: {a} has F={self.F}, {b} has F={other.F}. Resample the "
                "spectrograms to a common number of bands first "
                "(deepstrf.datasets.resample.resample_frequency); nothing is warped automatically.")
        if (self.audio_fs is None) != (other.audio_fs is None):
            waves, spec = (a, b) if self.audio_fs is not None else (b, a)
            raise IncompatibleDatasetsError(
                f"waveforms and spectrograms: {waves} holds waveforms (audio_fs set), {spec} spectrograms "
                "(audio_fs=None). Compute spectrograms of the waveforms first (with the other's bands and "
                "bin width); nothing is converted automatically.")
        if self.audio_fs != other.audio_fs:
            raise IncompatibleDatasetsError(
                f"audio_fs mismatch: {a} has audio_fs={self.audio_fs}, {b} has "
                f"audio_fs={other.audio_fs}. Resample the waveforms to one rate first.")

    def _concat_copy_attrs(self, source) -> None:
        super()._concat_copy_attrs(source)
        self.F = source.F
        self.audio_fs = source.audio_fs
        self.hearing_range_hz = source.hearing_range_hz
        if hasattr(source, "return_waveform"):  # deepSTRF's flag of waveform stimuli, set by its subclasses
            self.return_waveform = source.return_waveform

    def validate(self, *, deep: bool | None = None) -> None:
        super().validate(deep=deep)
        if not (isinstance(self.F, int) and self.F > 0):
            raise DatasetValidationError(f"self.F must be a positive int (got {self.F!r})")
        hr = self.hearing_range_hz
        if hr is not None and not (isinstance(hr, (tuple, list)) and len(hr) == 2 and 0 < hr[0] < hr[1]):
            raise DatasetValidationError(
                f"self.hearing_range_hz must be None or an increasing (low, high) pair (got {hr!r})")
        if getattr(self, "return_waveform", False):  # deepSTRF's flag of waveform stimuli
            self._validate_waveforms(isinstance(self.responses, list) if deep is None else deep)

    def _validate_waveforms(self, cells: bool) -> None:
        """Waveform stimuli ``(1, T_audio)`` lock to the response bins: ``hop`` samples per bin, so
        ``T_audio == hop * T`` of the stim's responses (checked where ``cells`` are in memory)."""
        fs = self.audio_fs
        if not (isinstance(fs, int) and not isinstance(fs, bool) and fs > 0):
            raise DatasetValidationError(f"waveform stimuli need self.audio_fs as a positive int (got {fs!r})")
        samples = fs * self.dt / 1000.0
        if round(samples) < 1 or abs(samples - round(samples)) > 1e-6:
            raise DatasetValidationError(
                f"waveform stimuli need a whole number of samples per bin: audio_fs * dt_ms / 1000 = {samples:g}; "
                f"choose audio_fs so that it is one (e.g. 48000 Hz at dt_ms=5)")
        if not cells:
            return
        hop = self.hop
        for s, stim in enumerate(self.stims):
            if stim.dim() != 2 or stim.shape[0] != 1:
                raise DatasetValidationError(f"waveform stim {s} must be (1, T_audio), got {tuple(stim.shape)}")
            bins = next((r.shape[-1] for r in self.responses[s] if not is_missing(r)), None)
            if bins is not None and stim.shape[1] != bins * hop:
                raise DatasetValidationError(
                    f"waveform stim {s} has {stim.shape[1]} samples; its responses have {bins} bins of {hop} "
                    f"samples: pad or crop it to {bins * hop}")
