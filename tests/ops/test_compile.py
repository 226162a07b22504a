"""torch.compile of a small model using the plain EMA VectorQuantizer.

What is proved here (DESIGN.md §4): the *training step* - forward, loss, ``loss.backward()`` and
the in-place EMA update of the layer's buffers - compiles with ``fullgraph=True`` (any graph break
is then an error, so success proves zero graph breaks) and gives the eager numbers.
``loss.backward()`` inside the compiled function needs
``torch._dynamo.config.trace_autograd_ops=True`` (torch 2.13).

Backends: ``cpu`` (the fused C++ custom ops; skipped when not built) and ``reference`` (plain
PyTorch; its boolean-mask row selection in ``cluster_stats`` is captured as a data-dependent shape
under ``fullgraph=True``, whereas ``torch._dynamo.explain``, which does not use fullgraph mode,
reports it as a break - hence fullgraph compilation, not explain, is the check).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vqkernels
from vqkernels.nn import VectorQuantizer

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


def _backends():
    why = vqkernels.available_backends("cpu")["cpu"]
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(bool(why), reason=why or "built")),
        "reference",
    ]


class TinyAE(nn.Module):
    def __init__(self, backend: str, **kw) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.vq = VectorQuantizer(16, 32, backend=backend, **kw)
        self.dec = nn.Linear(16, 8)

    def forward(self, x, mask=None):
        q, _, vq_loss = self.vq(self.enc(x), mask=mask)
        return ((self.dec(q) - x) ** 2).mean() + vq_loss


def train_step(model, x, mask=None):
    loss = model(x, mask)
    loss.backward()
    return loss.detach()


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 10, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("backend", _backends())
def test_training_step_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TinyAE(backend).train()
    compiled = copy.deepcopy(eager)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(train_step, fullgraph=True)
        for x in _batches(3):
            la = train_step(eager, x)
            lb = step(compiled, x)
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(
            getattr(compiled.vq, name), getattr(eager.vq, name), rtol=1e-5, atol=1e-6, msg=name
        )
    for (n, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(compiled.vq.perplexity, eager.vq.perplexity)
    assert compiled.vq.codebook_usage == eager.vq.codebook_usage


def test_masked_step_with_dead_code_restarts_compiles():
    # the restart path is tensor-only under compile: all codes but one start dead and far away,
    # so after one compiled step they must be copies of unmasked encoder outputs
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyAE("auto", threshold_ema_dead_code=0.5).train()
    with torch.no_grad():
        model.vq.codebook.fill_(1e3)
        model.vq.codebook[0] = 0.0
        model.vq.embed_sum.copy_(model.vq.codebook)
        model.vq.cluster_size.zero_()
        model.vq.cluster_size[0] = 1.0
    x = _batches(1)[0]
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 9:] = False  # 36 valid rows >= 31 dead codes: every dead code is restarted
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(train_step, fullgraph=True)
        step(model, x, mask)
    with torch.no_grad():
        h = model.enc(x)
    valid = h[mask]
    restarted = model.vq.codebook[1:]
    # (elementwise, not torch.cdist: cdist's matmul form is only ~1e-3 accurate here)
    to_valid = (restarted[:, None] - valid[None]).abs().amax(-1).min(dim=1).values
    to_masked = (restarted[:, None] - h[~mask][None]).abs().amax(-1).min(dim=1).values
    assert to_valid.max() < 1e-5
    assert to_masked.min() > 1e-3


def test_compiled_forward_refuses_uninitialized_kmeans():
    torch._dynamo.reset()
    vq = VectorQuantizer(4, 4, kmeans_init=True)
    f = torch.compile(vq, fullgraph=True)
    with pytest.raises(Exception, match="kmeans_init"):
        f(torch.randn(2, 5, 4))
    vq(torch.randn(2, 5, 4))  # eager step initializes; the compiled forward then runs
    q, idx, loss = f(torch.randn(2, 5, 4))
    assert q.shape == (2, 5, 4)


def test_issue10_features_compile_fullgraph(cpu_backend):
    """The rotation estimator, multi-head codebooks and seeded Gumbel sampling (C++ ops) compile
    with fullgraph=True and give the eager numbers (quantized, indices, loss and grad_x bit for
    bit).  The scalar objective that adds them up is compared with a tolerance: Inductor fuses
    ``(q * q).sum()`` into its own reduction order, which may differ from eager by an ulp."""
    x = torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    cb = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))

    def step(x, cb):
        q, idx, loss = vqkernels.quantize(x, cb, estimator="rotation", backend="cpu")
        drawn = vqkernels.nearest_code(
            x.detach(), cb, sample_temperature=0.5, seed=3, backend="cpu"
        )
        return (q * q).sum() + loss, idx, drawn, q, loss

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, cb)
    (gx,) = torch.autograd.grad(got[0], x)
    want = step(x, cb)
    (wx,) = torch.autograd.grad(want[0], x)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[3].detach(), want[3].detach())
    assert torch.equal(got[4].detach(), want[4].detach()) and torch.equal(gx, wx)
    torch.testing.assert_close(got[0].detach(), want[0].detach(), rtol=1e-6, atol=0)
