"""``loader(num_workers=2)`` from every way people run Python: a real interpreter per test, each
training two epochs over a store pool (and over an in-memory dataset whose transform and class
were defined in ``__main__``), with the platform's default start method and with forkserver as
the default (Python 3.14's on Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from stream_helpers import write_pool

RUN_TIMEOUT_S = 100

# The user's code: no `if __name__ == "__main__":` guard, as most research scripts are written.
TRAINING = '''
import json
import torch
from deepstrf import StreamingNeuralDataset
from deepstrf.datasets.synthetic import SyntheticAudioDataset

def aa2_only(ds):  # a select= function defined in __main__
    ds.select_pop_by_nrn_attr("dataset", "AA2")

class Mine(SyntheticAudioDataset):  # a dataset class defined in __main__
    def describe(self):
        return "mine"

def train(stream):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for epoch in range(2):
        n = 0
        for batch in stream.loader(num_workers=2, timeout=60):
            x = batch["stims"].flatten(1).mean(1, keepdim=True)
            y = torch.nan_to_num(batch["responses"]).flatten(1).mean(1, keepdim=True)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            n += len(batch["stim_meta"])
        seen.append(n)
    return seen

pooled = StreamingNeuralDataset(POOL, batch_size=4, collate="dense", select=aa2_only)
mem = Mine("aa1", scale=0.1, time_scale=0.02, seed=1)
mem.smooth_responses()  # records a lambda: no plain pickle
in_memory = StreamingNeuralDataset(mem, batch_size=2, collate="dense")
items = lambda stream: sum(len(b["stim_meta"]) for b in stream)  # read here, without workers
print("RESULT", json.dumps({"pooled": train(pooled), "in_memory": train(in_memory),
                            "n_pooled": items(pooled), "n_in_memory": items(in_memory)}))
'''


def guarded(code: str) -> str:
    """``code`` with its work (from the first loader on) under ``if __name__ == "__main__":``."""
    mark = "pooled = StreamingNeuralDataset"
    head, rest = code.split(mark, 1)
    return head + 'if __name__ == "__main__":\n' + textwrap.indent(mark + rest, "    ")


@pytest.fixture(scope="module")
def pool_url(tmp_path_factory) -> str:
    return write_pool(str(tmp_path_factory.mktemp("ways") / "stores"))


def _code(pool_url: str) -> str:
    return f"POOL = {pool_url!r}\n" + TRAINING


def _check(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert got["pooled"] == [got["n_pooled"]] * 2 and got["n_pooled"] > 0
    assert got["in_memory"] == [got["n_in_memory"]] * 2 and got["n_in_memory"] > 0


def _run(args: list[str], cwd: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=RUN_TIMEOUT_S)


# what Python 3.14 makes the default start method on Linux; loader() chooses its own either way
FORKSERVER_DEFAULT = 'import multiprocessing\nmultiprocessing.set_start_method("forkserver", force=True)\n'
DEFAULTS = {"platform": "", "forkserver": FORKSERVER_DEFAULT}


@pytest.mark.parametrize("default", DEFAULTS)
def test_an_unguarded_script(pool_url, tmp_path, default):
    (tmp_path / "train.py").write_text(DEFAULTS[default] + _code(pool_url))
    _check(_run(["train.py"], str(tmp_path)))


@pytest.mark.parametrize("default", DEFAULTS)
def test_a_guarded_script(pool_url, tmp_path, default):
    (tmp_path / "train.py").write_text(DEFAULTS[default] + guarded(_code(pool_url)))
    _check(_run(["train.py"], str(tmp_path)))


@pytest.mark.parametrize("guard", [False, True])
def test_a_module_run_with_dash_m(pool_url, tmp_path, guard):
    """``python -m lab.train``: workers started by forkserver import ``__main__`` by module name."""
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "__init__.py").write_text("")
    (tmp_path / "lab" / "train.py").write_text(guarded(_code(pool_url)) if guard else _code(pool_url))
    _check(_run(["-m", "lab.train"], str(tmp_path)))


@pytest.mark.parametrize("guard", [False, True])
def test_a_script_run_by_ipython(pool_url, tmp_path, guard):
    """``ipython train.py``: its history-writing thread is no reason to warn or to avoid fork."""
    pytest.importorskip("IPython")
    (tmp_path / "train.py").write_text(guarded(_code(pool_url)) if guard else _code(pool_url))
    out = _run(["-m", "IPython", "--quick", "--no-banner", "train.py"], str(tmp_path))
    _check(out)
    assert "RuntimeWarning" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("default", DEFAULTS)
def test_a_script_fed_through_stdin(pool_url, tmp_path, default):
    _check(_run(["-"], str(tmp_path), stdin=DEFAULTS[default] + _code(pool_url)))


@pytest.mark.parametrize("default", DEFAULTS)
def test_python_dash_c(pool_url, tmp_path, default):
    _check(_run(["-c", DEFAULTS[default] + _code(pool_url)], str(tmp_path)))


@pytest.mark.parametrize("default", DEFAULTS)
def test_a_jupyter_notebook(pool_url, tmp_path, default):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    head, tail = (DEFAULTS[default] + _code(pool_url)).split("def train(stream):")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(head),  # definitions in one cell
                                         nbformat.v4.new_code_cell("def train(stream):" + tail)])
    client = nbclient.NotebookClient(nb, timeout=RUN_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
    _check(subprocess.CompletedProcess([], 0, stdout=printed, stderr=""))


BUSY_THREAD = '''
import threading
import numpy as np

def multiply():  # a thread of the user's in BLAS while workers start: a fork can hang on its locks
    a = np.random.rand(300, 300)
    while True:
        a = a @ a
        a /= np.abs(a).max()

threading.Thread(target=multiply, daemon=True).start()
'''

WITH_INIT = '''
import os

def init(worker_id):  # a worker_init_fn defined in __main__
    os.environ["SEEN_BY_WORKER"] = str(worker_id)

stream = StreamingNeuralDataset(POOL, batch_size=4)
loader = stream.loader(num_workers=2, timeout=60, worker_init_fn=init)
print("METHOD", loader.multiprocessing_context.get_start_method())
print("EPOCHS", [sum(len(b["stim_meta"]) for b in loader) for _ in range(2)])
print("ITEMS", sum(len(b["stim_meta"]) for b in stream))  # read here, without workers
'''


@pytest.mark.parametrize("how", ["script", "stdin", "module"])
def test_an_unguarded_script_with_a_busy_thread_of_its_own(pool_url, tmp_path, how):
    """Forked workers could hang (in the fork itself: OpenBLAS's fork handler waits for a thread in
    a matrix product); forkserver workers would run the script again: they start by forkserver
    without running ``__main__``, and what they need of it (a worker_init_fn) travels by value."""
    code = f"POOL = {pool_url!r}\nimport json\nfrom deepstrf import StreamingNeuralDataset\n" + BUSY_THREAD + WITH_INIT
    if how != "stdin":
        (tmp_path / "train.py").write_text(code)
        out = _run(["train.py"] if how == "script" else ["-m", "train"], str(tmp_path))
    else:
        out = _run(["-"], str(tmp_path), stdin=code)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    items = int(printed["ITEMS"])
    assert items > 0 and json.loads(printed["EPOCHS"]) == [items, items]
    assert printed["METHOD"] == "forkserver" and "RuntimeWarning" not in out.stderr, out.stderr[-3000:]


def test_a_worker_that_raises_in_start_up_is_reported_with_its_exception(tmp_path):
    """A dataset whose unpickling fails in the worker (before the DataLoader's loop catches
    anything): the error names the worker's own exception, and comes within seconds."""
    script = textwrap.dedent('''
        import time
        import torch
        from deepstrf import StreamingNeuralDataset
        from deepstrf.datasets.synthetic import SyntheticAudioDataset
        from deepstrf.errors import StreamStalledError

        def refuse(state):
            raise ValueError("the lab's calibration file is missing on this node")

        class Fragile(SyntheticAudioDataset):
            def __reduce__(self):
                return refuse, ({},)

        if __name__ == "__main__":
            stream = StreamingNeuralDataset(Fragile("aa1", scale=0.1, time_scale=0.02, seed=1), batch_size=2)
            start = time.monotonic()
            try:
                for _ in stream.loader(num_workers=2, timeout=120, read_while_starting=False):
                    pass
            except StreamStalledError as exc:
                print("WAITED", round(time.monotonic() - start, 1))
                print(exc)
    ''')
    (tmp_path / "fragile.py").write_text(script)
    out = _run(["fragile.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a DataLoader worker died" in out.stdout
    assert "ValueError: the lab's calibration file is missing on this node" in out.stdout
    assert "never started its pass" not in out.stdout and "lock" not in out.stdout.split("What to do")[0]
    waited = float(out.stdout.split("WAITED ", 1)[1].split()[0])
    assert waited < 30  # seen dead within seconds, not at the 120 s timeout


# what a dataset object carries besides its arrays (which cross in shared memory): with 1 MB of
# it, the parent is usually still writing the worker's start-up data into their pipe (64 KB) when
# the worker dies, and gets a broken pipe (without, the worker dies after it has read it all)
NOTES_BYTES = {"no notes": 0, "1 MB of notes": 1 << 20}


@pytest.mark.parametrize("notes, read_while_starting, as_module", [
    ("no notes", False, False), ("no notes", True, False), ("1 MB of notes", False, False),
    ("1 MB of notes", True, False), ("no notes", False, True)])
def test_a_script_whose_top_fails_in_a_worker_is_reported_with_the_fix(tmp_path, notes, read_while_starting,
                                                                        as_module):
    """Code above the guard runs again in every worker that forkserver starts; where it raises
    there (a classic: ``set_start_method`` without ``force``), the worker dies before it reads its
    dataset (its parent may get a broken pipe sending a large one): the loader reports the
    worker's own exception and the fix."""
    script = textwrap.dedent(f'''
        import multiprocessing
        multiprocessing.set_start_method("forkserver")
        from deepstrf import StreamingNeuralDataset
        from deepstrf.datasets.synthetic import SyntheticAudioDataset
        from deepstrf.errors import StreamStalledError

        if __name__ == "__main__":
            recordings = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
            recordings.notes = "x" * {NOTES_BYTES[notes]}
            stream = StreamingNeuralDataset(recordings, batch_size=2)
            try:
                for _ in stream.loader(num_workers=2, timeout=120, read_while_starting={read_while_starting}):
                    pass
            except StreamStalledError as exc:
                print(exc)
    ''')
    (tmp_path / "top.py").write_text(script)
    out = _run(["-m", "top"] if as_module else ["top.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RuntimeError: context has already been set" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "if __name__" in out.stdout.split("What to do")[1]


def test_no_method_can_work_fails_before_any_worker_starts(tmp_path):
    """An unguarded script on a platform without a safe fork: the loader raises at once, naming the fix."""
    script = textwrap.dedent('''
        import multiprocessing
        from deepstrf.datasets.synthetic import SyntheticAudioDataset
        from deepstrf import StreamingNeuralDataset
        from deepstrf.errors import UnsafeMainError
        multiprocessing.get_all_start_methods = lambda: ["spawn"]  # as on Windows
        stream = StreamingNeuralDataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1),
                                        batch_size=2)
        try:
            stream.loader(num_workers=2)
        except UnsafeMainError as exc:
            print("REFUSED", exc)
    ''')
    (tmp_path / "mac.py").write_text(script)
    out = _run(["mac.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and 'if __name__ == "__main__":' in out.stdout and "mac.py" in out.stdout


def test_an_unguarded_script_under_torchrun(pool_url, tmp_path):
    """``torchrun --standalone --nproc_per_node=2 train.py``: every rank runs the script as
    ``__main__`` and trains with 2 workers of its own; each rank reads its share every epoch."""
    script = f"POOL = {pool_url!r}\n" + textwrap.dedent('''
        import json
        import torch
        import torch.distributed as dist
        from deepstrf import StreamingNeuralDataset

        dist.init_process_group("gloo")
        stream = StreamingNeuralDataset(POOL, batch_size=2, shuffle=True, seed=0)  # rank, world from dist
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        seen = []
        for epoch in range(2):
            n = 0
            for batch in stream.loader(num_workers=2, timeout=60):
                x = batch["stims"].flatten(1).mean(1, keepdim=True)
                loss = model(x).pow(2).mean()  # all ranks take the same number of steps, or this hangs
                opt.zero_grad(); loss.backward(); opt.step()
                n += len(batch["stim_meta"])
            seen.append(n)
        with open(f"rank{dist.get_rank()}.json", "w") as f:  # not stdout: the ranks' writes interleave there
            json.dump(seen, f)
        dist.destroy_process_group()
    ''')
    (tmp_path / "train.py").write_text(script)
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1] and per_rank[0][0] == per_rank[0][1] > 0


@pytest.mark.parametrize("default", DEFAULTS)
def test_an_unguarded_lightning_script(pool_url, tmp_path, default):
    pytest.importorskip("lightning")
    script = DEFAULTS[default] + f"POOL = {pool_url!r}\n" + textwrap.dedent('''
        import lightning, torch
        from deepstrf.lightning import PoolDataModule

        class Tiny(lightning.LightningModule):  # defined in an unguarded __main__
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.items = 0
            def training_step(self, batch, batch_idx):
                self.items += len(batch["stim_meta"])
                return ((self.w - batch["stims"].mean()) ** 2).sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = PoolDataModule(POOL, batch_size=4, collate="dense", num_workers=2,
                              loader_options={"timeout": 60})
        model = Tiny()
        lightning.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          limit_val_batches=0).fit(model, data)
        per_epoch = sum(len(b["stim_meta"]) for b in data.stream("train"))  # read here, no workers
        print("RESULT_ITEMS", model.items, per_epoch)
    ''')
    (tmp_path / "fit.py").write_text(script)
    out = _run(["fit.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    items, per_epoch = map(int, out.stdout.split("RESULT_ITEMS ", 1)[1].split()[:2])
    assert per_epoch > 0 and items == 2 * per_epoch


def test_an_unguarded_script_asking_for_forkserver_gets_workers_that_do_not_run_it_again(pool_url, tmp_path):
    """forkserver would re-run the script in every worker (it was refused): its workers start without
    running ``__main__``."""
    script = f"POOL = {pool_url!r}\n" + textwrap.dedent('''
        from deepstrf import StreamingNeuralDataset
        stream = StreamingNeuralDataset(POOL, batch_size=4)
        loader = stream.loader(num_workers=2, timeout=60, multiprocessing_context="forkserver")
        print("ITEMS", sum(len(b["stim_meta"]) for b in loader), sum(len(b["stim_meta"]) for b in stream))
    ''')
    (tmp_path / "explicit.py").write_text(script)
    out = _run(["explicit.py"], str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    with_workers, without = next(x for x in out.stdout.splitlines() if x.startswith("ITEMS ")).split()[1:]
    assert with_workers == without != "0"


def test_ctrl_c_while_the_workers_start_gives_only_the_scripts_keyboard_interrupt(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the worker server (importing torch) and a
    worker the main process was still sending its dataset to used to print tracebacks of their own."""
    import signal
    import time

    script = textwrap.dedent('''
        import time
        from deepstrf import StreamingNeuralDataset
        from deepstrf.datasets.synthetic import SyntheticAudioDataset

        if __name__ == "__main__":
            stream = StreamingNeuralDataset(SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.05, seed=1),
                                            batch_size=1)
            for _ in stream.loader(num_workers=2, timeout=60):  # forkserver: a dataset object of yours
                print("BATCH", flush=True)
                time.sleep(0.2)
    ''')
    (tmp_path / "train.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "BATCH\n"  # read by the main process while the workers start
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (-signal.SIGINT, 130, 1), err
    assert err.count("Traceback") == 1 and "KeyboardInterrupt" in err, err
