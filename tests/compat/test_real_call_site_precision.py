"""Issue 10 acceptance: real call sites under mixed precision (torch.autocast), where LR keeps its
codebook in fp32 (its guard names CUDA; ours also the CPU)."""

from __future__ import annotations

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

from real_call_sites import (  # noqa: E402
    CALL_SITES,
    TOL,
    assert_same,
    assert_state_equal,
    encode,
    forward_kwargs,
    strict_pair,
)
from torch import nn  # noqa: E402

import vqkernels.compat as compat  # noqa: E402

#: call sites whose codebook sees the layer's input directly (no project_in, which runs in bf16
#: under autocast in LR and ours alike)
UNPROJECTED_VQ_SITES = ["readme-vq-defaults", "speech-vqencoder-dead-codes", "zoo-vanilla-ema-fmap",
                        "bert-vits2-emo-heads-stochastic", "svq-cosine-gumbel-straight-through",
                        "mel-rvq-shared-stochastic", "semantic-id-rvq-cosine-dropout", "3dgs-rvq-learnable-inplace-adam",
                        "meshgpt-rvq-masked", "soundstream-grvq", "style-grvq-ste", "robot-action-grvq-shared"]


@pytest.mark.parametrize("name", UNPROJECTED_VQ_SITES)
def test_real_call_site_under_cpu_autocast_keeps_fp32_codes(name):
    """Mixed precision on the CPU (torch.autocast('cpu', bfloat16)): ours decides codes, losses and
    EMA state in fp32, i.e. gives LR's fp32 numbers -- LR's own guard names only 'cuda', so on the
    CPU parts of LR's search drift with the autocast setting (1-47 % of these sites' codes)."""
    site = CALL_SITES[name]
    up, ours = strict_pair(getattr(vqp, site.cls), getattr(compat, site.cls), **site.kwargs)
    for step in range(2):
        x = torch.randn(*site.shape, generator=torch.Generator().manual_seed(step))
        fkw = forward_kwargs(site, step)
        torch.manual_seed(100 + step)
        out_up = up(x, **fkw)
        torch.manual_seed(100 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ours = ours(x, **fkw)
        assert_same(out_up, out_ours, f"step {step}", **TOL)
        assert_state_equal(up, ours)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["readme-vq-defaults", "soundstream-grvq", "mel-rvq-shared-stochastic",
                                  "meshgpt-rvq-masked", "vqgan-vae-cosine-fmap"])
def test_real_call_site_under_cuda_autocast_matches_lr(name):
    """Mixed-precision training (accelerate / torch.autocast bf16 on the GPU): LR runs its codebook
    (k-means, distances, Gumbel logits, EMA) with CUDA autocast off, so the codes and EMA state are
    fp32 decisions on the encoder's output; ours must pick the same codes and keep the same state.
    (Values are not compared: the parts outside LR's codebook, e.g. its rotation, run in bf16.)"""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    site = CALL_SITES[name]
    up, ours = strict_pair(getattr(vqp, site.cls), getattr(compat, site.cls), **site.kwargs)
    up, ours = up.cuda(), ours.cuda()
    stub = nn.Linear(site.shape[site.channel_dim], site.shape[site.channel_dim]).cuda()
    for step in range(site.steps):
        x = torch.randn(*site.shape, generator=torch.Generator().manual_seed(step)).cuda()
        fkw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in forward_kwargs(site, step).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            h = encode(stub, x, site.channel_dim)
            torch.manual_seed(100 + step)
            out_up = up(h, **fkw)
            torch.manual_seed(100 + step)
            out_ours = ours(h, **fkw)
        assert torch.equal(out_up[1], out_ours[1]), f"step {step}: indices"
        a, b = up.state_dict(), ours.state_dict()
        for k in a:
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
