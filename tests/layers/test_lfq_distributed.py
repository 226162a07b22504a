"""compat LFQ under torch.distributed (2 CPU processes, gloo, each with half of the batch): the
batch (codebook) entropy is the entropy of the code distribution averaged over ALL ranks' tokens,
so it equals the single-process value on the whole batch, and its gradient flows back through the
all-reduce.  (vector-quantize-pytorch 1.32 means to do this but drops the all-reduced tensor --
``dist_nn.all_reduce`` is out of place -- and uses the local mean divided by the world size; the
drop-in does the intended mean.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from vqkernels.compat import LFQ
from vqkernels.distributed import find_free_port

pytestmark = pytest.mark.distributed

WORLD = 2


def _data() -> torch.Tensor:
    return torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0)) * 0.05


def _run(part: slice) -> dict:
    torch.manual_seed(0)
    lfq = LFQ(dim=8)
    x = _data()[part].requires_grad_()
    (_, _, _), breakdown = lfq(x, return_loss_breakdown=True)
    breakdown.batch_entropy.backward()
    return {"batch_entropy": breakdown.batch_entropy.detach(), "grad": x.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        per = 4 // WORLD
        torch.save(_run(slice(rank * per, (rank + 1) * per)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_batch_entropy_is_the_all_rank_mean(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(find_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run(slice(None))
    per = 4 // WORLD
    for r, res in enumerate(results):
        torch.testing.assert_close(res["batch_entropy"], single["batch_entropy"], rtol=1e-6, atol=1e-6)
        # d(entropy of the global mean)/dx for this rank's rows; the all-reduce backward sums the
        # ranks' upstream gradients (each rank backpropagates its own copy of the same loss), so
        # each rank's rows get WORLD x the single-process gradient
        expected = WORLD * single["grad"][r * per:(r + 1) * per]
        torch.testing.assert_close(res["grad"], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
