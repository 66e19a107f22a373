"""Run by tests/test_shards.py under `accelerate launch --num_processes 2`: each rank streams one epoch
of INDEX with 2 loader workers (the split comes from the process group), all-reduces once per batch
(a rank with fewer batches would leave the other waiting until the timeout), and writes its keys."""
import json
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from visrep.data import shards as S

index_path, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
rank, world = S.rank_and_world()
assert (rank, world) == (acc.process_index, 2)
ds = S.ShardStream(S.load_index(index_path), lambda s, o, e: int(s["__key__"]), torch.tensor, 4, seed=5,
                   rank=rank, world=world, shuffle_buffer=16)
keys = []
for batch in S.StreamLoader(ds, num_workers=2):
    n = torch.ones(())
    torch.distributed.all_reduce(n)
    assert n.item() == 2
    keys += batch.tolist()
open(f"{out}{rank}.json", "w").write(json.dumps(keys))
