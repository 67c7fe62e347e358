"""A pool's metadata table: rows built one at a time, edits kept, column answers honest."""

import pytest

from deepstrf.datasets.metatable import MetaSlice, MetaTable

N = 1000


def table(loads: list) -> MetaTable:
    def load():
        loads.append(1)
        return {"uid": ([f"u{i}" for i in range(N)], set()),
                "area": (["A" if i % 3 else "B" for i in range(N)], {5, 6})}
    return MetaTable(N, load)


def test_a_row_is_built_alone_and_stays_the_same_dict():
    loads = []
    t = table(loads)
    row = t[7]
    assert row == {"uid": "u7", "area": "A"} and t._rows is None  # no other row built
    assert t[5] == {"uid": "u5"}  # a row where a key is absent has no such key
    assert t[-1] == {"uid": f"u{N - 1}", "area": "B" if (N - 1) % 3 == 0 else "A"}
    row["label"] = "edited"
    assert t[7] is row and loads == [1]
    rows = t.rows()  # building all rows keeps the ones handed out, with their edits
    assert rows[7] is row and rows[7]["label"] == "edited" and len(rows) == N
    with pytest.raises(IndexError):
        t[N]


def test_matching_sees_edits_of_rows_handed_out():
    t = table([])
    t[3]["area"] = "C"   # was "B"
    t[4]["area"] = "B"   # was "A"
    t[9] = {"uid": "new", "area": "B"}  # replaced ("B" before too)
    expected = [i for i in range(N) if (t[i].get("area") == "B")]
    assert t.matching("area", "B") == expected
    assert 3 not in expected and 4 in expected and 9 in expected and 5 not in expected
    assert t.matching("label", "x") == []
    t.rows()
    assert t.matching("area", "B") is None  # built rows: the caller tests them


def test_a_slice_iterates_its_rows_without_building_the_others():
    t = table([])
    part = MetaSlice(t, 10, 13)
    assert [r["uid"] for r in part] == ["u10", "u11", "u12"] and part[-1]["uid"] == "u12"
    assert t._rows is None and sorted(t._handed_out) == [10, 11, 12]


def test_a_table_answers_what_code_written_for_a_list_does():
    t = MetaTable(N, table([])._load, "stim_meta")
    rows = [dict(r) for r in table([]).rows()]
    assert t == rows and rows == t and not t != rows and list(t) == rows and [r for r in t] == rows
    assert t[2:5] == rows[2:5] and isinstance(t[2:5], list)
    assert t + [{"x": 1}] == rows + [{"x": 1}] and [{"x": 1}] + t == [{"x": 1}] + rows
    assert isinstance(t + [], list) and isinstance([] + t, list) and t.copy() == rows
    part = MetaSlice(t, 10, 13)
    assert part == rows[10:13] and part + [] == rows[10:13] and [] + part == rows[10:13]


@pytest.mark.parametrize("edit", [lambda m: m.append({}), lambda m: m.extend([{}]), lambda m: m.pop(),
                                  lambda m: m.insert(0, {}), lambda m: m.clear(), lambda m: m.sort(),
                                  lambda m: m.__delitem__(0), lambda m: m.__iadd__([{}])])
def test_editing_the_sequence_says_to_take_a_list(edit):
    t = MetaTable(N, table([])._load, "nrn_meta")
    for meta in (t, MetaSlice(t, 0, 3)):
        with pytest.raises(TypeError, match=r"nrn_meta is a lazy table .* meta = list\(ds\.nrn_meta\)"):
            edit(meta)
    assert len(t) == N


def test_threads_reading_at_once_load_the_table_once():
    """Batches read in several threads ask for rows at the same moment: one load, one dict per row."""
    import threading
    import time

    loads = []

    def slow_load():
        time.sleep(0.05)  # long enough for every thread to find the table not loaded
        loads.append(1)
        return {"uid": ([f"u{i}" for i in range(N)], set())}

    t = MetaTable(N, slow_load)
    start = threading.Barrier(4)
    got = []

    def read():
        start.wait()
        got.append(t[3])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert loads == [1] and len(got) == 4 and all(row is got[0] for row in got)
