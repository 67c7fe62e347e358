"""Stimuli kept outside the NWB file: one file per stimulus in a folder (local or any fsspec URL),
named after the values of the presentation table's stimulus column.

Stimulus ``v`` is the file ``<stim_dir>/<v>.wav``, ``.flac`` (read with ``soundfile``; channels
averaged to one) or ``.npy`` (a 1-D waveform, or a 2-D ``(time, F)`` spectrogram, sampled at
``stim_rate`` per second); ``v`` may name a file in a sub-folder (``songs/bird1``) or carry its
suffix already. A :class:`StimulusFile` has the attributes of an NWB series that the conversion
reads, so a file becomes a spectrogram exactly as an embedded series does.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import NWBImportError, NWBReadError
from ..store.location import Location

AUDIO_SUFFIXES = (".wav", ".flac")
ARRAY_SUFFIX = ".npy"
SUFFIXES = (*AUDIO_SUFFIXES, ARRAY_SUFFIX)
LISTED_MISSING = 20  # missing names shown in the error


@dataclass
class StimulusFile:
    """One stimulus read from a file, shaped like the NWB series the conversion reads."""

    name: str
    data: np.ndarray
    rate: float
    timestamps: None = None
    starting_time: float = 0.0


class StimulusFolder:
    """The stimulus files under ``url``, listed once."""

    def __init__(self, url: str, storage_options: dict | None = None, rate: float | None = None) -> None:
        self.loc = Location.parse(url, storage_options)
        self.rate = rate
        try:
            self.fs, root = self.loc.filesystem()
            found = self.fs.find(root, detail=True)
        except OSError as e:
            raise NWBReadError(f"stim_dir {self.loc.url} cannot be listed ({e}); check the URL and "
                               "storage_options (--stim-dir, -S).") from e
        self.root = root.rstrip("/")
        self.files: dict[str, dict] = {}
        for path, info in found.items():
            rel = path[len(self.root) + 1:] if path.startswith(self.root + "/") else posixpath.basename(path)
            if rel.lower().endswith(SUFFIXES):
                self.files[rel] = info
        if not self.files:
            raise NWBImportError(f"stim_dir {self.loc.url} holds no stimulus file ({', '.join(SUFFIXES)}); check "
                                 "the folder (--stim-dir).")

    def identity(self) -> dict[str, Any]:
        """The folder's URL and a digest of its listing (name, size, version of every file): a changed
        stimulus file changes the import fingerprint."""
        rows = sorted((name, int(info.get("size") or 0),
                       str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")))
                      for name, info in self.files.items())
        digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
        return {"url": self.loc.url, "files": len(rows), "listing": f"sha256:{digest}"}

    def file_of(self, value: Any) -> str | None:
        """The file named by stim column value ``value`` (relative to the folder), or None."""
        name = str(value).strip("/")
        if name in self.files:
            return name
        matches = [name + s for s in SUFFIXES if name + s in self.files]
        if len(matches) > 1:
            raise NWBImportError(f"stim_dir {self.loc.url}: stimulus {value!r} has several files {matches}; "
                                 "keep one per stimulus.")
        return matches[0] if matches else None

    def read_all(self, values: list[Any], where: str) -> list[StimulusFile]:
        """The stimuli named by ``values``; every missing name is listed in one error."""
        files = [self.file_of(v) for v in values]
        missing = [str(v) for v, f in zip(values, files) if f is None]
        if missing:
            shown = ", ".join(missing[:LISTED_MISSING]) + (f" and {len(missing) - LISTED_MISSING} more"
                                                           if len(missing) > LISTED_MISSING else "")
            raise NWBImportError(
                f"{where}: {len(missing)} of {len(values)} stimuli have no file in stim_dir {self.loc.url} "
                f"(looked for NAME{', NAME'.join(SUFFIXES)}): {shown}. Add the files, or point --stim-dir "
                "(stim_dir=) at the folder that holds them.")
        return [self.read(f) for f in files]

    def read(self, rel: str) -> StimulusFile:
        url = f"{self.loc.url}/{rel}"
        with self.fs.open(f"{self.root}/{rel}", "rb") as f:
            if rel.lower().endswith(ARRAY_SUFFIX):
                if self.rate is None:
                    raise NWBImportError(f"{url}: a .npy stimulus has no sample rate; give it with stim_rate= "
                                         "(--stim-rate HZ: samples, or spectrogram frames, per second).")
                data = np.load(f, allow_pickle=False)
                if data.ndim not in (1, 2):
                    raise NWBImportError(f"{url}: a .npy stimulus must be 1-D (waveform) or 2-D (time, F), "
                                         f"got shape {data.shape}.")
                return StimulusFile(rel, data, float(self.rate))
            import soundfile

            try:
                data, rate = soundfile.read(f, dtype="float32", always_2d=True)
            except (RuntimeError, soundfile.LibsndfileError) as e:
                raise NWBReadError(f"{url} cannot be read as audio ({e}).") from e
        return StimulusFile(rel, data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], float(rate))
