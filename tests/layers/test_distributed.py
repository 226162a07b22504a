"""Distributed VectorQuantizer: 2 CPU processes (gloo), each with half of every batch, must end
with the codebook that one process gets on the whole batch.

One spawn runs every scenario (process start-up dominates: a few seconds in all).  The layers are
built *before* ``init_process_group`` to check that the sync decision is taken at call time.

* ``exact``: dyadic inputs (multiples of 1/16, |x| <= 4) so every per-rank fp32 sum is exact and
  the all-reduced statistics equal the whole-batch ones bit for bit; reference backend on both
  sides (same blend arithmetic) -> ``torch.equal``.
* ``auto``: Gaussian inputs and a padding mask, default backend.  The per-rank fp32 sums are
  rounded before the all-reduce adds them, so the EMA state may differ from the single-process
  one by a few ulps -> ``rtol=1e-6``.
* ``random``: k-means init and dead-code restarts (random draws; rank 0 decides and broadcasts):
  the ranks must hold identical state.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from vqkernels.distributed import find_free_port
from vqkernels.nn import VectorQuantizer

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def _data(seed: int, dyadic: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dyadic:
        return torch.randint(-64, 65, (4, 16, 8), generator=g).float() / 16
    return torch.randn(4, 16, 8, generator=g)


def _mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(4, 16, generator=g) > 0.25


def _make(scenario: str) -> VectorQuantizer:
    torch.manual_seed(0)
    if scenario == "exact":
        return VectorQuantizer(8, 24, decay=0.9, backend="reference")
    if scenario == "auto":
        return VectorQuantizer(8, 24, decay=0.9, codebook_dim=6)
    # threshold 3 > the mean usage (64 rows / 24 codes): codes are restarted on every step
    return VectorQuantizer(8, 24, decay=0.5, kmeans_init=True, threshold_ema_dead_code=3.0)


def _run(vq: VectorQuantizer, scenario: str, part: slice) -> dict:
    for step in range(STEPS):
        x = _data(step, scenario == "exact")[part]
        mask = _mask(step)[part] if scenario == "auto" else None
        vq(x, mask=mask)
    return {k: v.clone() for k, v in vq.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    layers = {s: _make(s) for s in ("exact", "auto", "random")}  # before init_process_group
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        per = 4 // WORLD
        part = slice(rank * per, (rank + 1) * per)
        out = {s: _run(vq, s, part) for s, vq in layers.items()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    torch.multiprocessing.spawn(
        _worker, args=(find_free_port(), out_dir), nprocs=WORLD, join=True
    )
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _single(scenario: str) -> dict:
    return _run(_make(scenario), scenario, slice(None))


def test_exact_codebook_equals_whole_batch_run(results):
    single = _single("exact")
    for r in range(WORLD):
        for k in ("codebook", "cluster_size", "embed_sum"):
            assert torch.equal(results[r]["exact"][k], single[k]), (r, k)


def test_masked_gaussian_matches_whole_batch_run(results):
    single = _single("auto")
    for r in range(WORLD):
        for k, v in single.items():
            torch.testing.assert_close(results[r]["auto"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    # the ranks agree with each other exactly (same reduced statistics, same blend)
    for k in single:
        assert torch.equal(results[0]["auto"][k], results[1]["auto"][k]), k


def test_kmeans_and_restarts_are_identical_across_ranks(results):
    a, b = results[0]["random"], results[1]["random"]
    assert bool(a["initted"]) and bool(b["initted"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # codes restarted in the last step are copies of rank 0's rows (rank 0 decides), never of
    # rank 1's; EMA-updated codes are averages and match no row exactly
    last = _data(STEPS - 1, False)
    rows0, rows1 = last[:2].reshape(-1, 8), last[2:].reshape(-1, 8)
    cb = a["codebook"]
    from_rank0 = (cb[:, None, :] == rows0[None]).all(-1).any(-1)
    from_rank1 = (cb[:, None, :] == rows1[None]).all(-1).any(-1)
    assert from_rank0.any() and not from_rank1.any()
    assert torch.all(a["cluster_size"][from_rank0] == 3.0)
