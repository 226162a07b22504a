"""vqkernels.nn.lfq: the factorized LFQ entropies against the direct N x 2^d formula in fp64
(upstream's clamp ``log(max(p, 1e-5))`` included), values and gradients, across temperatures from
near-uniform (every code above the clamp) to near-one-hot, odd bit counts and empty-ish inputs."""

from __future__ import annotations

import pytest
import torch

from vqkernels.nn.lfq import half_codebook, lfq_entropy_terms


def _direct(x, a, tau, eps=1e-5):
    codes = half_codebook(x.shape[-1], dtype=x.dtype) * a
    prob = (2 * tau * torch.einsum("ncd,kd->nck", x, codes)).softmax(-1)

    def ent(p):
        return -(p * p.clamp(min=eps).log()).sum(-1)

    return ent(prob).mean(), ent(prob.mean(0)).mean()


@pytest.mark.parametrize("d,scale,tau,a", [(1, 1.0, 1.0, 1.0), (5, 1.0, 10.0, 1.0), (9, 0.3, 100.0, 1.0),
                                           (12, 1.0, 0.05, 0.5), (14, 0.01, 1.0, 1.0), (16, 0.2, 100.0, 0.25)])
def test_factorized_entropies_match_direct_fp64(d, scale, tau, a):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(40, 2, d, generator=g) * scale).requires_grad_()
    ps, cb = lfq_entropy_terms(x, a, tau)
    (gx,) = torch.autograd.grad(ps - 0.7 * cb, x)
    x64 = x.detach().double().requires_grad_()
    ps64, cb64 = _direct(x64, a, tau)
    (gx64,) = torch.autograd.grad(ps64 - 0.7 * cb64, x64)
    # fp32 vs fp64 over up to 2^16 terms: a few ulps of log(2^d) ~ 10
    torch.testing.assert_close(ps.double(), ps64, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(cb.double(), cb64, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-6 * max(1.0, tau * a))


def test_per_row_batch_entropy_equals_per_sample():
    x = torch.randn(7, 1, 6)
    ps, cb = lfq_entropy_terms(x, 1.0, 1.0, per_row_batch_entropy=True)
    assert torch.equal(ps, cb)


def test_lfq_train_step_never_materializes_n_by_codebook():
    # record the size of every tensor any aten op produces during a training step (forward and
    # backward) of the compat LFQ at 2^16 codes: nothing may come near N x 2^d elements
    from vqkernels.compat import LFQ
    from vqkernels.testing import LargestAtenOutput

    n, d = 512, 16
    lfq = LFQ(dim=d)
    x = (torch.randn(2, n // 2, d) * 0.05).requires_grad_()
    with LargestAtenOutput() as sizes:
        q, _, aux = lfq(x)
        (q.sum() + aux).backward()
    # the [2^d] mean distribution and the [N, 2^(d/2) + 1] prefix sums are the largest
    assert sizes.largest <= max(2**d, n * (2 ** (d // 2) + 1)) < n * 2**d // 64
