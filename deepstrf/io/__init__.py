"""Reading recording formats into deepstrf datasets.

:func:`from_nwb` reads one NWB session (an HDF5 file or an NWB-Zarr folder; local, ``s3://``,
``https://``; stimuli embedded or in a ``stim_dir``) into an ``AudioNeuralDataset`` /
``VideoNeuralDataset``; :func:`import_sessions` (``deepstrf import-nwb``) writes one source store per
session, on local worker processes or a Dask cluster. pynwb itself is imported when a file is opened.
"""

from .nwb import NWBConversion, from_nwb
from .nwb_import import ImportResult, import_sessions

__all__ = ["ImportResult", "NWBConversion", "from_nwb", "import_sessions"]
