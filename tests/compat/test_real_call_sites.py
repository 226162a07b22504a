"""Issue 10 acceptance: the real call sites of ``real_call_sites.CALL_SITES`` replayed on LR 1.32 and
on the drop-ins (training steps, eval, checkpoints both ways, deep copies, extra returns, the
helpers the projects touch); the catalogue and the tolerances are explained in real_call_sites.py."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

from real_call_sites import (  # noqa: E402
    CALL_SITES,
    TOL,
    assert_same,
    assert_state_equal,
    forward_kwargs,
    run_call_site,
    strict_pair,
)

import vqkernels.compat as compat  # noqa: E402


@pytest.mark.parametrize("name", list(CALL_SITES))
def test_real_call_site_matches_lr(name):
    run_call_site(CALL_SITES[name])


#: the extra returns projects ask for, where LR's forward takes them
EXTRA_RETURNS = ("return_loss_breakdown", "return_all_codes")
#: LR 1.32 itself fails on these (channel-first indices into its einx code lookup: AxisSizeError)
EXTRA_RETURNS_BROKEN_IN_LR = {"speaker-rfsq-channel-first"}


@pytest.mark.parametrize("name", [n for n, s in CALL_SITES.items()
                                  if n not in EXTRA_RETURNS_BROKEN_IN_LR
                                  and set(EXTRA_RETURNS) & set(inspect.signature(getattr(vqp, s.cls).forward).parameters)])
def test_real_call_site_with_extra_returns_matches_lr(name):
    """The same call sites asking for LR's loss breakdown (VectorQuantize, LFQ) or all codes (the
    residual families): the longer tuples, and the gradients through every returned term."""
    site = CALL_SITES[name]
    accepted = inspect.signature(getattr(vqp, site.cls).forward).parameters
    extra = {k: True for k in EXTRA_RETURNS if k in accepted}
    run_call_site(replace(site, forward={**site.forward, **extra}, decode=None, steps=2))


#: the attributes the projects read off the layers (when LR's class has them, ours must agree)
HELPER_ATTRIBUTES = ("codebook", "codebooks", "codebook_size", "codebook_dim", "num_quantizers", "dim", "heads",
                     "groups", "has_projections", "levels", "num_codebooks", "scales")


@pytest.mark.parametrize("name", list(CALL_SITES))
def test_real_call_site_helpers_match_lr(name):
    """What the projects touch besides forward: the attributes above, ``get_codes_from_indices``
    (SoundStream / MeshGPT decode paths), and the writable ``.codebook`` of VectorQuantize."""
    site = CALL_SITES[name]
    up, ours = strict_pair(getattr(vqp, site.cls), getattr(compat, site.cls), **site.kwargs)
    up.eval(), ours.eval()
    x = torch.randn(*site.shape, generator=torch.Generator().manual_seed(0))
    fkw = forward_kwargs(site, 0)
    torch.manual_seed(1)
    indices = up(x, **fkw)[1]
    torch.manual_seed(1)
    ours(x, **fkw)  # k-means initialises on the first forward, in eval too
    for attr in HELPER_ATTRIBUTES:
        if not hasattr(up, attr):
            continue
        theirs, mine = getattr(up, attr), getattr(ours, attr)
        if isinstance(theirs, torch.Tensor):
            assert_same(theirs, mine, attr, **TOL)
        else:
            assert theirs == mine, f"{attr}: {theirs!r} vs {mine!r}"
    if hasattr(up, "get_codes_from_indices") and site.channel_dim == -1:
        assert_same(up.get_codes_from_indices(indices), ours.get_codes_from_indices(indices), "codes", **TOL)
    if site.cls == "VectorQuantize":
        # raw codes, not unit vectors: LR's cosine codebooks then score x̂·c against them.  Under
        # no_grad: LR's setter copies into the codebook in place, which autograd refuses for a
        # learnable one (learnable_codebook, or orthogonal_reg_weight > 0) outside no_grad
        new_codes = torch.randn(up.codebook.shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            up.codebook, ours.codebook = new_codes, new_codes.clone()
        torch.manual_seed(1)
        theirs = up(x, **fkw)
        torch.manual_seed(1)
        assert_same(theirs, ours(x, **fkw), "after .codebook = ...", **TOL)


def test_channel_first_residual_vq_call_site():
    """Audio diffusion autoencoder, public file (index id 39878447872): ResidualVQ(num_quantizers,
    dim, codebook_size, kmeans_init=True, kmeans_iters=100, threshold_ema_dead_code=2,
    channel_last=False, sync_codebook=True) on the encoder's (B, C, T).  LR 1.32 itself fails on
    it (its residual bookkeeping assumes channel-last: "Sizes of tensors must match"); ours runs
    and gives LR's channel-last numbers on the transposed input (sync_codebook needs a process
    group in both, so one process runs without it)."""
    kw = dict(num_quantizers=2, dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=100,
              threshold_ema_dead_code=2)
    x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        vqp.ResidualVQ(channel_last=False, **kw)(x)
    torch.manual_seed(0)
    up = vqp.ResidualVQ(**kw)
    ours = compat.ResidualVQ(channel_last=False, **kw)
    ours.load_state_dict(up.state_dict(), strict=True)
    for step in range(2):
        x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(step))
        torch.manual_seed(10 + step)
        q_up, idx_up, loss_up = up(x.transpose(1, 2))
        torch.manual_seed(10 + step)
        q_ours, idx_ours, loss_ours = ours(x)
        assert_same(q_up.transpose(1, 2), q_ours, "quantized", **TOL)
        assert_same((idx_up, loss_up), (idx_ours, loss_ours), "indices, losses", **TOL)
        assert_state_equal(up, ours)
