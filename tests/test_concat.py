"""Block-diagonal concatenation (CONTRACT §2)."""

import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from toydata import OtherAudio, ToyAudio, ToyVideo, cells_equal

import deepstrf
from deepstrf.datasets import NeuralDataset
from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.concat import DuplicateUIDWarning
from deepstrf.datasets import views
from deepstrf.datasets.views import ResponseGrid
from deepstrf.errors import IncompatibleDatasetsError
from deepstrf.utils.data import concat_neural_datasets


def eager_concat(parts):
    """Reference: the full S x N grid built cell by cell."""
    N = sum(p.N_neurons for p in parts)
    rows, n0 = [], 0
    for p in parts:
        for s in range(p.get_S()):
            row = [torch.full((1, 1), float("nan"))] * N
            row[n0:n0 + p.N_neurons] = list(p.responses[s])
            rows.append(row)
        n0 += p.N_neurons
    return rows


def test_block_diagonal_values_and_mask():
    a, b, c = ToyAudio(1, S=4, N=5), ToyAudio(2, S=3, N=6), ToyAudio(3, S=2, N=3)
    pool = concat_neural_datasets([a, b, c])
    assert (pool.get_S(), pool.N_neurons) == (9, 14)
    expected = eager_concat([a, b, c])
    for s in range(9):
        for n in range(14):
            assert cells_equal(pool.responses[s][n], expected[s][n]), (s, n)
    assert pool.responses[0][13].shape == (1, 1) and torch.isnan(pool.responses[0][13]).all()
    eager = ToyAudio(9)
    eager.responses, eager.N_neurons = expected, 14
    assert torch.equal(pool.nrn_masks, eager._compute_nrn_masks())
    assert not pool.nrn_masks[:4, 5:].any() and not pool.nrn_masks[4:7, :5].any()
    assert [s["uid"] for s in pool.stim_meta[:5]] == ["a1-s0", "a1-s1", "a1-s2", "a1-s3", "a2-s0"]


def test_add_equals_nary_and_single_input_is_identity():
    a, b = ToyAudio(1), ToyAudio(2)
    x, y = a + b, concat_neural_datasets([a, b])
    assert torch.equal(x.nrn_masks, y.nrn_masks)
    assert x.stim_meta == y.stim_meta and x.nrn_meta == y.nrn_meta
    assert all(cells_equal(x.responses[s][n], y.responses[s][n]) for s in range(x.get_S()) for n in range(x.N_neurons))
    assert concat_neural_datasets([a]) is a


def test_nested_equals_flat():
    a, b, c = ToyAudio(1), ToyAudio(2, S=2), OtherAudio(3, N=2)
    flat = concat_neural_datasets([a, b, c])
    nested = concat_neural_datasets([concat_neural_datasets([a, b]), c])
    other = (a + b) + c
    for d in (nested, other):
        assert type(d) is type(flat)
        assert d.stim_meta == flat.stim_meta and d.nrn_meta == flat.nrn_meta
        assert torch.equal(d.nrn_masks, flat.nrn_masks)
        assert d.source_names == flat.source_names == ["ToyAudio", "ToyAudio", "OtherAudio"]
        assert all(cells_equal(d.responses[s][n], flat.responses[s][n])
                   for s in range(d.get_S()) for n in range(d.N_neurons))


def test_provenance_names_and_sources_untouched():
    a, b = ToyAudio(1), ToyAudio(2)
    before = ([dict(m) for m in a.stim_meta], [dict(m) for m in a.nrn_meta])
    pool = concat_neural_datasets([a, b], names=["aa1", "aa2"])
    assert {m["dataset"] for m in pool.stim_meta[:a.get_S()]} == {"aa1"}
    assert {m["dataset"] for m in pool.nrn_meta[a.N_neurons:]} == {"aa2"}
    assert (a.stim_meta, a.nrn_meta) == before
    default = a + OtherAudio(3)
    assert default.nrn_meta[-1]["dataset"] == "OtherAudio"
    pool.smooth_responses(5.0)
    pool.normalize_responses("max")
    pool.standardize_stims()
    assert cells_equal(a.responses[1][0], ToyAudio(1).responses[1][0])
    assert torch.equal(a.stims[0], ToyAudio(1).stims[0])
    with pytest.raises(ValueError, match="one entry per dataset"):
        concat_neural_datasets([a, b], names=["only-one"])


def test_store_backed_sources_are_labelled_with_their_saved_class_name(tmp_path):
    """An opened store's class is the generic kind; the class name it was saved with is its label,
    as the in-memory source's class name is."""
    for seed, cls in enumerate((ToyAudio, OtherAudio)):
        deepstrf.save_dataset(cls(seed), str(tmp_path / f"{cls.__name__}.zarr"), progress=False)
    opened = [deepstrf.open_dataset(str(tmp_path / f"{name}.zarr")) for name in ("ToyAudio", "OtherAudio")]
    pool = concat_neural_datasets(opened)
    assert pool.source_names == ["ToyAudio", "OtherAudio"]
    assert {m["dataset"] for m in pool.nrn_meta} == {"ToyAudio", "OtherAudio"}
    assert pool.select_pop_by_nrn_attr("dataset", "OtherAudio") == list(range(5, 10))


def test_a_pool_keeps_its_in_memory_sources_as_they_were_when_pooled():
    """As deepSTRF's concatenation copies its sources' lists: a transform, a replaced row or stim
    applied to a source afterwards does not reach the pool."""
    a, b = ToyAudio(1), ToyAudio(2)
    pool = a + b
    cell, stim = pool.responses[0][0].clone(), pool.stims[0]
    a.normalize_responses("max")
    a.smooth_responses(5.0)
    a.standardize_stims()
    a.responses[1] = [torch.full((1, 1), float("nan"))] * a.N_neurons
    a._invalidate_nrn_masks()
    assert torch.equal(pool.responses[0][0], cell) and pool.stims[0] is stim
    assert bool(pool.nrn_masks[1, :a.N_neurons].any()) and not bool(a.nrn_masks[1].any())
    assert not torch.equal(a.responses[0][0], cell)
    b.responses[0][0] = torch.full((1, 1), float("nan"))  # a cell set by hand is shared: once the
    pool._invalidate_nrn_masks()                          # pool's masks are reset, they follow it
    assert not bool(pool.nrn_masks[a.get_S(), a.N_neurons]) and not bool(pool.coverage.to_dense()[a.get_S(), a.N_neurons])


def test_a_pool_keeps_its_store_backed_sources_as_they_were_when_pooled(tmp_path):
    from deepstrf import open_dataset, save_dataset

    save_dataset(ToyAudio(1), str(tmp_path / "a.zarr"), progress=False)
    a = open_dataset(str(tmp_path / "a.zarr"))
    pool = a + ToyAudio(2)
    cell, stim = pool.responses[0][0].clone(), pool.stims[0].clone()
    a.normalize_responses("max")
    a.standardize_stims()
    assert torch.equal(pool.responses[0][0], cell) and torch.equal(pool.stims[0], stim)
    assert not torch.equal(a.responses[0][0], cell)


def test_an_in_memory_pool_has_lists_as_deepstrf_gives():
    a, b = ToyAudio(1), ToyAudio(2, S=3)
    pool = a + b
    assert type(pool.stims) is list and len(pool.stims) == 7
    assert torch.cat(pool.stims, -1).shape[-1] == sum(x.shape[-1] for x in a.stims + b.stims)
    assert len(pool.responses[0] + [torch.zeros(1, 1)]) == pool.N_neurons + 1
    row = [torch.ones(2, 12 + 3 * 0)] * pool.N_neurons
    pool.responses[0] = row  # a whole row replaced, cross-block cells included
    pool._invalidate_nrn_masks()
    assert bool(pool.nrn_masks[0].all()) and pool.responses[0][pool.N_neurons - 1] is row[-1]
    with pytest.raises(ValueError, match="one cell per neuron"):
        pool.responses[1] = row[:3]
    assert cells_equal(a.responses[0][0], ToyAudio(1).responses[0][0])  # the source untouched
    nested = (a + b) + ToyAudio(3)  # still flattened: the pool's list is the one it was made with
    assert nested.source_names == ["ToyAudio"] * 3
    pool.stims[0] = pool.stims[0] * 2  # a pool whose stims were edited is a part of its own
    assert (pool + ToyAudio(3)).source_names == ["ToyAudio", "ToyAudio"]


class _Lab(ToyAudio):
    """A deepSTRF-style subclass that extends concatenation's documented hooks."""

    checked: list = []

    def __init__(self, seed, species):
        super().__init__(seed)
        self.species = species

    def _concat_check_compat(self, other):  # deepSTRF's signature: no names
        super()._concat_check_compat(other)
        _Lab.checked.append((self.species, other.species))
        if self.species != other.species:
            raise AssertionError(f"species mismatch: {self.species} vs {other.species}")

    def _concat_copy_attrs(self, source):
        super()._concat_copy_attrs(source)
        self.species = source.species


def test_a_subclass_check_sees_every_other_input_with_its_own_signature():
    _Lab.checked.clear()
    pool = _Lab(1, "finch") + _Lab(2, "finch")
    assert type(pool) is _Lab and pool.species == "finch" and _Lab.checked == [("finch", "finch")]
    with pytest.raises(AssertionError, match="species mismatch: finch vs ferret"):
        concat_neural_datasets([_Lab(1, "finch"), _Lab(2, "finch"), _Lab(3, "ferret")])
    with pytest.raises(IncompatibleDatasetsError, match="F mismatch"):  # the built-in check still names both
        _Lab(1, "finch") + ToyAudio(2, F=9)


class _Rated(ToyAudio):
    """A hook reading an attribute only its __init__ sets (a pool, made without __init__, lacks it)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.sample_rate = 24000

    def _concat_check_compat(self, other):
        super()._concat_check_compat(other)
        if self.sample_rate != other.sample_rate:
            raise AssertionError("sample rates differ")


def test_a_subclass_check_on_a_pool_asks_its_sources():
    ab = _Rated(1) + _Rated(2)
    for pooled in (ab + _Rated(3), _Rated(3) + ab, concat_neural_datasets([ab, _Rated(3)])):
        assert pooled.get_S() == 12 and pooled.source_names == ["_Rated"] * 3
    odd = _Rated(3)
    odd.sample_rate = 16000
    with pytest.raises(AssertionError, match="sample rates differ"):
        ab + odd


def waveform_attrs(d: AudioNeuralDataset) -> AudioNeuralDataset:
    """``d`` with the attributes of a waveform dataset (what the concatenation checks look at)."""
    d.audio_fs, d.return_waveform = 8000, True
    return d


@pytest.mark.parametrize("make_b, pattern", [
    (lambda: ToyAudio(2, dt_ms=5.0), r"dt mismatch: left has dt_ms=1.0, right has dt_ms=5.0"),
    (lambda: ToyAudio(2, F=9), r"F mismatch: left has F=8, right has F=9"),
    # before: 'audio_fs mismatch ... Resample the waveforms to one rate first'
    (lambda: waveform_attrs(ToyAudio(2)), r"waveforms and spectrograms: right holds waveforms \(audio_fs set\), "
                                          r"left spectrograms \(audio_fs=None\)\. Compute spectrograms"),
])
def test_incompatible_audio_refused(make_b, pattern):
    with pytest.raises(IncompatibleDatasetsError, match=pattern) as err:
        concat_neural_datasets([ToyAudio(1), make_b()], names=["left", "right"])
    assert isinstance(err.value, AssertionError) and isinstance(err.value, ValueError)


def test_frame_size_mismatch_and_every_input_checked():
    with pytest.raises(IncompatibleDatasetsError, match=r"frame size mismatch \(H, W\): v1 has \(6, 5\), v2 has \(7, 5\)"):
        concat_neural_datasets([ToyVideo(1), ToyVideo(2, H=7)], names=["v1", "v2"])
    # a video first, then two audio sources that disagree on F: still refused
    with pytest.raises(IncompatibleDatasetsError, match="F mismatch: a8 has F=8, a9 has F=9"):
        concat_neural_datasets([ToyVideo(1), ToyAudio(2, F=8), ToyAudio(3, F=9)], names=["v", "a8", "a9"])
    with pytest.raises(AssertionError, match="dt mismatch"):
        ToyAudio(1) + ToyAudio(2) + ToyAudio(3, dt_ms=2.0)


def rgb(v: ToyVideo) -> ToyVideo:
    """``v`` with its grayscale frames copied into 3 channels."""
    v.stims = [x.expand(3, *x.shape[1:]).clone() for x in v.stims]
    v.validate()
    return v


def test_channel_count_mismatch_refused():
    """Before: an RGB and a grayscale source of one frame size pooled; their batches then broadcast
    the gray frames into 3 channels (streamed) or failed with a bare shape error."""
    with pytest.raises(IncompatibleDatasetsError, match=r"channel count mismatch: c3 has C=3 channels per frame, "
                                                        r"c1 has C=1\. .*grayscale"):
        concat_neural_datasets([rgb(ToyVideo(1)), ToyVideo(2)], names=["c3", "c1"])
    assert concat_neural_datasets([rgb(ToyVideo(1)), rgb(ToyVideo(2))]).stims[0].shape[0] == 3


def test_refusal_survives_python_O():
    code = ("import sys; sys.path.insert(0, 'tests'); from toydata import ToyAudio;\n"
            "try:\n    ToyAudio(1) + ToyAudio(2, F=9)\nexcept ValueError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("refused F mismatch")


def test_non_dataset_inputs():
    a = ToyAudio(1)
    with pytest.raises(TypeError):
        a + 42
    with pytest.raises(TypeError):
        42 + a
    with pytest.raises(TypeError, match="entry 1 is a int"):
        concat_neural_datasets([a, 42])
    with pytest.raises(ValueError, match="at least one"):
        concat_neural_datasets([])


def test_result_type_is_most_specific_common_ancestor():
    assert type(ToyAudio(1) + ToyAudio(2)) is ToyAudio
    assert type(ToyAudio(1) + OtherAudio(2)) is AudioNeuralDataset
    mixed = ToyAudio(1) + ToyVideo(2)
    assert type(mixed) is NeuralDataset
    assert len(mixed) == mixed.get_S()
    assert (ToyAudio(1) + OtherAudio(2, F=8)).F == 8
    assert (ToyVideo(1) + ToyVideo(2)).H == 6


class ExplodingGrid(ResponseGrid):
    """A grid whose cells must never be read."""

    def __init__(self, S, N):
        super().__init__(S, N)

    def _read_row(self, s, neurons):
        raise AssertionError("concatenation read a cell")

    def _mask(self):
        return torch.ones((self.n_stims, self.n_neurons), dtype=torch.bool)


def test_concat_is_lazy_and_mask_comes_from_source_masks():
    big = [ToyAudio(i) for i in range(2)]
    for d in big:
        d.responses = ExplodingGrid(d.get_S(), d.N_neurons)
        d._invalidate_nrn_masks()
    pool = concat_neural_datasets(big)
    assert pool.nrn_masks.sum() == sum(d.get_S() * d.N_neurons for d in big)
    assert len(pool) == pool.get_S()
    assert torch.isnan(pool.responses[0][pool.N_neurons - 1]).all()  # cross-block: no read


def test_duplicate_uids_warned_and_reported():
    a = ToyAudio(1)
    with pytest.warns(DuplicateUIDWarning, match="duplicate UIDs"):
        pool = a + ToyAudio(1)
    assert pool.summary()["duplicate_uids"]["neuron"][:2] == ["a1-n0", "a1-n1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "duplicate_uids" not in (a + ToyAudio(2)).summary()


def test_compatibility_of_many_inputs_is_checked_by_group_and_every_mismatch_reported():
    inputs = [ToyAudio(i, S=1, N=1, F=8) for i in range(300)] + [ToyAudio(i, S=1, N=1, F=9) for i in range(300)]
    inputs.append(ToyAudio(0, S=1, N=1, F=8, dt_ms=2.0))
    names = [f"s{i}" for i in range(len(inputs))]
    with pytest.raises(IncompatibleDatasetsError) as e:
        concat_neural_datasets(inputs, names=names)
    message = str(e.value)
    assert message.startswith("3 incompatibilities")
    assert "F mismatch: s0 (and 299 more input(s) like it) has F=8, s300 (and 299 more input(s) like it) has F=9" in message
    assert "dt mismatch: s0 (and 299 more input(s) like it) has dt_ms=1.0, s600 has dt_ms=2.0" in message
    assert "s300 (and 299 more input(s) like it) has dt_ms=1.0, s600 has dt_ms=2.0" in message
    pooled = concat_neural_datasets(inputs[:300], names=names[:300])  # one group: nothing to compare
    assert pooled.get_S() == 300


class _SlowPart(views.LazySequence):
    """A part whose batched read waits 0.2 s (a remote store), recording the thread that read."""

    def __init__(self, n, remote):
        super().__init__(n)
        self.waits_on_network, self.threads = remote, []

    def _get(self, i):
        return i

    def _get_many(self, indices):
        self.threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return [10 * len(self) + i for i in indices]


@pytest.mark.parametrize("remote", [True, False])
def test_parts_that_wait_on_the_network_are_read_at_once(remote):
    parts = [_SlowPart(3, remote), _SlowPart(4, remote), _SlowPart(5, remote)]
    seq = views.ConcatSequence(parts)
    start = time.perf_counter()
    got = seq.read_many([11, 0, 4, 2, 7])
    elapsed = time.perf_counter() - start
    assert got == [50 + 4, 30, 40 + 1, 32, 50 + 0]  # in the order asked, whatever the reading order
    threads = [t for p in parts for t in p.threads]
    if remote:
        assert elapsed < 0.45 and all(t.startswith("deepstrf-parts") for t in threads)
    else:
        assert elapsed >= 0.6 and set(threads) == {threading.current_thread().name}
