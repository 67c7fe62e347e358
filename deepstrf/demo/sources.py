"""Demo sources: synthetic LN-Poisson sets shaped like CRCNS AA1, AA2 and NS1.

NS1 is recorded at another bin width (5 ms) and with another number of bands
(34) than AA1/AA2 (1 ms, 32 bands). Concatenation refuses such mismatches,
so the demo converts explicitly with the package's opt-in helpers before
pooling: AA1/AA2 are re-binned to 5 ms (counts summed) and NS1 is resampled
to 32 bands. Ground truth (the expected count per bin) is converted the
same way, so the model is scored against the truth of the data it sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..datasets.neural_dataset import NeuralDataset
from ..datasets.resample import rebin_counts, rebin_dataset, resample_frequency
from ..datasets.synthetic import SyntheticAudioDataset

COMMON_DT_MS = 5.0
COMMON_F = 32
PRESETS = (("AA1", "aa1"), ("AA2", "aa2"), ("NS1", "ns1"))


@dataclass
class DemoSource:
    """One synthetic source: the generator (ground truth) and its converted, poolable form."""

    name: str
    synthetic: SyntheticAudioDataset
    converted: NeuralDataset
    factor: int
    conversions: list[str]
    _truth_cache: dict = field(default_factory=dict, repr=False)

    def truth(self, s: int) -> torch.Tensor:
        """Expected counts per converted bin ``(N, T_s')`` of every neuron for local stim ``s``."""
        if s not in self._truth_cache:
            rate = self.synthetic.true_rate(s)
            self._truth_cache[s] = rebin_counts(rate, self.factor) if self.factor > 1 else rate
        return self._truth_cache[s]


def make_sources(scale: float, time_scale: float, seed: int = 0,
                 presets=PRESETS) -> list[DemoSource]:
    """Generate the sources (lazily: responses are drawn on read) and convert them to 5 ms / 32 bands."""
    out = []
    for k, (name, preset) in enumerate(presets):
        syn = SyntheticAudioDataset(preset, scale=scale, time_scale=time_scale, seed=seed * 1000 + k)
        conv: NeuralDataset = syn
        steps = []
        factor = round(COMMON_DT_MS / syn.dt)
        if syn.dt != COMMON_DT_MS:
            conv = rebin_dataset(conv, COMMON_DT_MS)
            steps.append(f"rebin_dataset: dt {syn.dt:g} -> {COMMON_DT_MS:g} ms (counts summed over {factor} bins)")
        if syn.F != COMMON_F:
            steps.append(f"resample_frequency: F {syn.F} -> {COMMON_F} bands (linear interpolation)")
            conv = resample_frequency(conv, COMMON_F)
        conv.name = name
        out.append(DemoSource(name, syn, conv, factor, steps))
    return out


class TruthLookup:
    """Ground truth for the cells of a batch, found through stim and neuron UIDs.

    UIDs survive saving, pooling and streaming, so the lookup works for any
    dataset built from the demo sources (a pool, or one source alone).
    """

    def __init__(self, sources: list[DemoSource]):
        self.sources = {src.name: src for src in sources}
        self.stim = {m["uid"]: (src.name, s) for src in sources for s, m in enumerate(src.converted.stim_meta)}
        self.neuron = {m["uid"]: (src.name, n) for src in sources for n, m in enumerate(src.converted.nrn_meta)}

    def for_cells(self, stim_meta: list[dict], item_index: torch.Tensor, neuron_uids: list[str],
                  T: int) -> torch.Tensor:
        """``(n_cells, T)`` expected counts; cell ``c`` is item ``item_index[c]``, neuron ``neuron_uids[c]``."""
        out = torch.zeros((len(neuron_uids), T))
        for c, (b, uid) in enumerate(zip(item_index.tolist(), neuron_uids)):
            src, s = self.stim[stim_meta[b]["uid"]]
            src_n, n = self.neuron[uid]
            if src_n != src:
                raise ValueError(f"cell pairs a {src} stim with a {src_n} neuron: not a recorded pair")
            rate = self.sources[src].truth(s)[n]
            t = min(T, rate.shape[0])
            out[c, :t] = rate[:t]
        return out
