"""Datasets whose stimuli are videos ``(C, H, W, T)``."""

from __future__ import annotations

from ...errors import IncompatibleDatasetsError
from ..neural_dataset import DatasetValidationError, NeuralDataset


class VideoNeuralDataset(NeuralDataset):
    """Neural dataset with visual stimuli of frame size ``(H, W)``."""

    def __init__(self, path: str, dt_ms: float):
        super().__init__(path, dt_ms)
        self.H = -1
        self.W = -1

    def get_dt(self) -> float:
        """Bin width in ms."""
        return self.dt

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
