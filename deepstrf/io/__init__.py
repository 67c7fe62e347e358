"""Reading recording formats into deepstrf datasets.

:func:`from_nwb` reads one NWB session (local, ``s3://``, ``https://``) into an
``AudioNeuralDataset`` / ``VideoNeuralDataset``; ``deepstrf import-nwb`` (:mod:`.nwb_import`)
writes one source store per session. pynwb is imported on first use.
"""

from __future__ import annotations

from typing import Any


def from_nwb(path_or_url: Any, **kwargs: Any) -> Any:
    """See :func:`deepstrf.io.nwb.from_nwb`."""
    from .nwb import from_nwb as _from_nwb

    return _from_nwb(path_or_url, **kwargs)


__all__ = ["from_nwb"]
