"""Reading recording formats into deepstrf datasets.

:func:`from_nwb` reads one NWB session (local, ``s3://``, ``https://``) into an
``AudioNeuralDataset`` / ``VideoNeuralDataset``; :func:`import_sessions` (``deepstrf import-nwb``)
writes one source store per session. pynwb itself is imported when a file is opened.
"""

from .nwb import NWBConversion, from_nwb
from .nwb_import import ImportResult, import_sessions

__all__ = ["ImportResult", "NWBConversion", "from_nwb", "import_sessions"]
