"""Several real DDP ranks (gloo on CPU, spawned processes): exactly once, equal batch counts."""

import json
import os
import socket
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from deepstrf.stream import StreamingNeuralDataset

from stream_helpers import batch_keys, item_key, loader_timeout, small_pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, workers: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pool = small_pool()
        s = StreamingNeuralDataset(pool, batch_size=2, seed=4)  # rank and world from torch.distributed
        result = {}
        for epoch in (0, 1):
            s.set_epoch(epoch)
            keys, steps = [], 0
            for batch in DataLoader(s, batch_size=None, num_workers=workers, timeout=loader_timeout(workers)):
                keys += batch_keys(batch)
                steps += 1
                t = torch.ones(1)
                dist.all_reduce(t)  # a rank with fewer batches would hang here
            result[epoch] = {"keys": keys, "steps": steps, "len": len(s)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,workers", [(2, 1), (3, 0)])
def test_ddp_ranks_read_every_item_once(tmp_path, world, workers):
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path), workers), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    pool = small_pool()
    expected = Counter(item_key(pool[i]) for i in range(len(pool)))
    orders = []
    for epoch in ("0", "1"):
        per_rank = [r[epoch] for r in results]
        assert len({r["steps"] for r in per_rank}) == 1
        assert per_rank[0]["steps"] == per_rank[0]["len"]
        keys = Counter(k for r in per_rank for k in r["keys"])
        assert set(keys) == set(expected)
        assert sum(keys.values()) == len(pool) + (-len(pool)) % world  # padding: < world repeats
        orders.append([k for r in per_rank for k in r["keys"]])
    assert orders[0] != orders[1]
