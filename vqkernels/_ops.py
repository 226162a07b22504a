"""THE place where vqkernels' operator schemas, fake (meta) impls and autograd are registered.

Backends attach kernels to these schemas:

* C++ CPU (``csrc/cpu``): ``TORCH_LIBRARY_IMPL(vqkernels, CPU, m)`` in ``vqkernels._C``;
* C++ CUDA (``csrc/cuda/bindings.cpp``): ``TORCH_LIBRARY_IMPL(vqkernels, CUDA, m)`` in
  ``vqkernels._C_cuda``;
* Triton (``vqkernels/triton``): separate ``vqkernels::*_triton`` ops defined with
  ``torch.library.triton_op`` (a triton_op owns its schema), whose fake impls and autograd are
  registered next to their launchers.

The ops take already-flattened 2-D inputs (``x: [N, D]``); ``vqkernels.functional`` does the
flattening, validation and backend choice.  Schemas (one name per op across every layer):

``nearest_code(x[N,D], codebook[K,D], metric, sample_temperature=0, seed=0)
    -> (indices[N] i64, distance[N] f32)``
``cluster_stats(x[N,D], indices[N] i64, num_codes) -> (counts[K] f32, sums[K,D] f32)``
``ema_update_(codebook!, cluster_size!, embed_sum!, x, indices, decay, eps) -> ()``
``quantize(x, codebook, beta, metric, codebook_loss, estimator="ste")
    -> (quantized[N,D], indices[N], loss[] f32)``
``quantize_backward(grad_q, grad_loss, x, codebook, indices, beta, codebook_loss, estimator="ste")
    -> (grad_x[N,D], grad_codebook[K,D] or [0] when codebook_loss is False)``

Multi-head (one codebook per head): every op also takes ``codebook [H, K, D]`` with
``x [N, H, D]`` and ``indices [N, H]`` (outputs ``[N, H]``; ``counts [H, K]``, ``sums
[H, K, D]``; EMA state ``[H, K]`` / ``[H, K, D]``).  ``sample_temperature > 0``: Gumbel-max
sampling with the counter-based noise of ``vqkernels.reference.sampling`` keyed by ``seed``.
``estimator``: ``"ste"`` or ``"rotation"`` (the rotation trick's backward).
"""

from __future__ import annotations

import torch

NAMESPACE = "vqkernels"

_lib = torch.library.Library(NAMESPACE, "DEF")

_lib.define(
    "nearest_code(Tensor x, Tensor codebook, str metric, float sample_temperature=0., int seed=0) "
    "-> (Tensor indices, Tensor distance)"
)
_lib.define("cluster_stats(Tensor x, Tensor indices, int num_codes) -> (Tensor counts, Tensor sums)")
_lib.define(
    "ema_update_(Tensor(a!) codebook, Tensor(b!) cluster_size, Tensor(c!) embed_sum, "
    "Tensor x, Tensor indices, float decay, float eps) -> ()"
)
_lib.define(
    "quantize(Tensor x, Tensor codebook, float beta, str metric, bool codebook_loss, "
    "str estimator=\"ste\") -> (Tensor quantized, Tensor indices, Tensor loss)"
)
_lib.define(
    "quantize_backward(Tensor grad_quantized, Tensor grad_loss, Tensor x, Tensor codebook, "
    "Tensor indices, float beta, bool codebook_loss, str estimator=\"ste\") "
    "-> (Tensor grad_x, Tensor grad_codebook)"
)

OP_NAMES = ("nearest_code", "cluster_stats", "ema_update_", "quantize", "quantize_backward")


# ---------------------------------------------------------------------------------------------
# Fake impls: check and allocate only (they run under torch.compile / FakeTensor / meta).
# ---------------------------------------------------------------------------------------------


def _check_heads(x, codebook) -> tuple[int, ...]:
    """Leading output shape: ``(N,)`` for ``x [N, D]`` + ``codebook [K, D]``, ``(N, H)`` for
    ``x [N, H, D]`` + ``codebook [H, K, D]``."""
    if codebook.dim() == 3:
        torch._check(x.dim() == 3, lambda: "a [H, K, D] codebook needs x of shape [N, H, D]")
        torch._check(x.shape[1] == codebook.shape[0], lambda: "x and codebook must share H")
        torch._check(x.shape[2] == codebook.shape[2], lambda: "x and codebook must share D")
        return (x.shape[0], x.shape[1])
    torch._check(x.dim() == 2 and codebook.dim() == 2, lambda: "x and codebook must be 2-D")
    torch._check(x.shape[1] == codebook.shape[1], lambda: "x and codebook must share D")
    return (x.shape[0],)


@torch.library.register_fake(f"{NAMESPACE}::nearest_code")
def _nearest_code_fake(x, codebook, metric, sample_temperature=0.0, seed=0):
    lead = _check_heads(x, codebook)
    return x.new_empty(lead, dtype=torch.int64), x.new_empty(lead, dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::cluster_stats")
def _cluster_stats_fake(x, indices, num_codes):
    torch._check(x.dim() in (2, 3), lambda: "x must be 2-D (or 3-D multi-head)")
    heads = (x.shape[1],) if x.dim() == 3 else ()
    return (
        x.new_empty(heads + (num_codes,), dtype=torch.float32),
        x.new_empty(heads + (num_codes, x.shape[-1]), dtype=torch.float32),
    )


@torch.library.register_fake(f"{NAMESPACE}::ema_update_")
def _ema_update_fake(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    torch._check(codebook.shape == embed_sum.shape, lambda: "codebook/embed_sum shape mismatch")
    return None


@torch.library.register_fake(f"{NAMESPACE}::quantize")
def _quantize_fake(x, codebook, beta, metric, codebook_loss, estimator="ste"):
    lead = _check_heads(x, codebook)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(lead, dtype=torch.int64),
        x.new_empty((), dtype=torch.float32),
    )


@torch.library.register_fake(f"{NAMESPACE}::quantize_backward")
def _quantize_backward_fake(
    grad_quantized, grad_loss, x, codebook, indices, beta, codebook_loss, estimator="ste"
):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if codebook_loss:
        grad_cb = torch.empty_like(codebook, memory_format=torch.contiguous_format)
    else:
        grad_cb = codebook.new_empty((0,))
    return grad_x, grad_cb


# ---------------------------------------------------------------------------------------------
# Autograd for quantize: straight-through or rotation-trick estimator + commitment (+ codebook)
# loss, fused backward kernel.
# ---------------------------------------------------------------------------------------------


def _quantize_setup_context(ctx, inputs, output):
    x, codebook, beta, metric, codebook_loss = inputs[:5]
    ctx.estimator = inputs[5] if len(inputs) > 5 else "ste"
    _, indices, _ = output
    ctx.save_for_backward(x, codebook, indices)
    ctx.beta = beta
    ctx.codebook_loss = codebook_loss
    ctx.mark_non_differentiable(indices)


def _quantize_backward(ctx, grad_quantized, grad_indices, grad_loss):
    x, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(x)
    if grad_loss is None:
        grad_loss = x.new_zeros((), dtype=torch.float32)
    grad_x, grad_cb = torch.ops.vqkernels.quantize_backward(
        grad_quantized.contiguous(), grad_loss, x, codebook, indices, ctx.beta, ctx.codebook_loss,
        ctx.estimator,
    )  # fmt: skip
    return grad_x, (grad_cb if ctx.codebook_loss else None), None, None, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::quantize", _quantize_backward, setup_context=_quantize_setup_context
)


# ---------------------------------------------------------------------------------------------
# codebook_softmax family: code_distribution and soft_quantize (streamed softmax over the codes).
#
# code_distribution(x[N,D], codebook[K,D], row_weight[N] f32, temperature, metric,
#     row_group[N] i64 or None, num_groups)
#     -> (logsumexp[N] f32, entropy[N] f32, mean_probs[K] f32, or [G,K] with row_group)
#     grouped: mean_probs[g] = Σ_{i: row_group_i = g} row_weight_i·p_i (G = num_groups ≥ 1;
#     group ids outside [0, G): an error (checked by functional/ and the cpu kernel)
# code_distribution_backward(grad_logsumexp[N] or [0], grad_entropy[N] or [0],
#     grad_mean_probs[K] ([G,K] grouped) or [0], x, codebook, row_weight, logsumexp, entropy,
#     temperature, metric, row_group, num_groups, need_grad_codebook=True, need_grad_x=True)
#     -> (grad_x[N,D] dtype of x, grad_codebook[K,D] dtype of codebook)   ([0] grads = zero)
#     need_grad_codebook=False: grad_codebook is an empty [0] tensor and the kernels skip the
#     streamed code pass that computes it (autograd passes ctx.needs_input_grad[1]: the
#     codebook is usually an EMA buffer without requires_grad); need_grad_x=False likewise for
#     grad_x (ctx.needs_input_grad[0])
# soft_quantize(x[N,D], keys[K,D], values[K,D], temperature, metric)
#     -> (out[N,D] dtype of x, logsumexp[N] f32, indices[N] i64 = argmax_k logits, ties -> lowest)
# soft_quantize_backward(grad_out[N,D], x, keys, values, out, logsumexp, temperature, metric)
#     -> (grad_x, grad_keys, grad_values)
# metric: "l2" | "dot" | "euclidean" (cosine = "dot" on normalized inputs, in functional/).
# ---------------------------------------------------------------------------------------------

_lib.define(
    "code_distribution(Tensor x, Tensor codebook, Tensor row_weight, float temperature, "
    "str metric, Tensor? row_group=None, int num_groups=0) "
    "-> (Tensor logsumexp, Tensor entropy, Tensor mean_probs)"
)
_lib.define(
    "code_distribution_backward(Tensor grad_logsumexp, Tensor grad_entropy, "
    "Tensor grad_mean_probs, Tensor x, Tensor codebook, Tensor row_weight, Tensor logsumexp, "
    "Tensor entropy, float temperature, str metric, Tensor? row_group=None, int num_groups=0, "
    "bool need_grad_codebook=True, bool need_grad_x=True) -> (Tensor grad_x, Tensor grad_codebook)"
)
_lib.define(
    "soft_quantize(Tensor x, Tensor keys, Tensor values, float temperature, str metric) "
    "-> (Tensor out, Tensor logsumexp, Tensor indices)"
)
_lib.define(
    "soft_quantize_backward(Tensor grad_out, Tensor x, Tensor keys, Tensor values, Tensor out, "
    "Tensor logsumexp, float temperature, str metric) "
    "-> (Tensor grad_x, Tensor grad_keys, Tensor grad_values)"
)

CODEBOOK_SOFTMAX_OP_NAMES = (
    "code_distribution",
    "code_distribution_backward",
    "soft_quantize",
    "soft_quantize_backward",
)


@torch.library.register_fake(f"{NAMESPACE}::code_distribution")
def _code_distribution_fake(
    x, codebook, row_weight, temperature, metric, row_group=None, num_groups=0
):
    torch._check(x.dim() == 2 and codebook.dim() == 2, lambda: "x and codebook must be 2-D")
    torch._check(x.shape[1] == codebook.shape[1], lambda: "x and codebook must share D")
    n, k = x.shape[0], codebook.shape[0]
    f32 = dict(dtype=torch.float32)
    if row_group is None:
        mp_shape = (k,)
    else:
        torch._check(num_groups >= 1, lambda: "row_group needs num_groups >= 1")
        torch._check(row_group.shape == (n,), lambda: "row_group must have N entries")
        mp_shape = (num_groups, k)
    return x.new_empty((n,), **f32), x.new_empty((n,), **f32), x.new_empty(mp_shape, **f32)


@torch.library.register_fake(f"{NAMESPACE}::code_distribution_backward")
def _code_distribution_backward_fake(
    grad_logsumexp, grad_entropy, grad_mean_probs, x, codebook, row_weight, logsumexp, entropy,
    temperature, metric, row_group=None, num_groups=0, need_grad_codebook=True, need_grad_x=True,
):  # fmt: skip
    def grad_like(t, needed):  # an unneeded gradient is an empty [0] tensor
        if not needed:
            return t.new_empty((0,))
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return grad_like(x, need_grad_x), grad_like(codebook, need_grad_codebook)


@torch.library.register_fake(f"{NAMESPACE}::soft_quantize")
def _soft_quantize_fake(x, keys, values, temperature, metric):
    torch._check(x.shape[1] == keys.shape[1], lambda: "x and keys must share D")
    torch._check(keys.shape == values.shape, lambda: "keys and values must have the same shape")
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((x.shape[0],), dtype=torch.float32),
        x.new_empty((x.shape[0],), dtype=torch.int64),
    )


@torch.library.register_fake(f"{NAMESPACE}::soft_quantize_backward")
def _soft_quantize_backward_fake(grad_out, x, keys, values, out, logsumexp, temperature, metric):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, keys, values)
    )


def _code_distribution_setup_context(ctx, inputs, output):
    x, codebook, row_weight, temperature, metric = inputs[:5]
    row_group = inputs[5] if len(inputs) > 5 else None
    ctx.num_groups = inputs[6] if len(inputs) > 6 else 0
    ctx.num_inputs = len(inputs)
    logsumexp, entropy, _ = output
    ctx.save_for_backward(x, codebook, row_weight, logsumexp, entropy, row_group)
    ctx.temperature = temperature
    ctx.metric = metric


def code_distribution_autograd(namespace: str = NAMESPACE):
    """The backward of ``<namespace>::code_distribution`` (tests reuse it for the reference ops)."""

    def backward(ctx, grad_logsumexp, grad_entropy, grad_mean_probs):
        x, codebook, row_weight, logsumexp, entropy, row_group = ctx.saved_tensors
        # An absent gradient travels as an empty tensor: the kernels then skip that term (and,
        # for mean_probs, a whole streamed pass).
        empty = x.new_empty((0,), dtype=torch.float32)
        grads = [
            empty if g is None else g.float().contiguous()
            for g in (grad_logsumexp, grad_entropy, grad_mean_probs)
        ]
        # A codebook without requires_grad (an EMA buffer, the usual case in the losses) skips
        # the codebook-gradient pass: a second full streamed pass over every logits tile.
        need_grad_x, need_grad_codebook = ctx.needs_input_grad[:2]
        op = getattr(torch.ops, namespace).code_distribution_backward
        grad_x, grad_cb = op(
            *grads, x, codebook, row_weight, logsumexp, entropy, ctx.temperature, ctx.metric,
            row_group, ctx.num_groups, need_grad_codebook, need_grad_x,
        )  # fmt: skip
        grad_x, grad_cb = grad_x if need_grad_x else None, grad_cb if need_grad_codebook else None
        return (grad_x, grad_cb) + (None,) * (ctx.num_inputs - 2)

    return backward


def _soft_quantize_setup_context(ctx, inputs, output):
    x, keys, values, temperature, metric = inputs
    out, logsumexp, indices = output
    ctx.save_for_backward(x, keys, values, out, logsumexp)
    ctx.temperature = temperature
    ctx.metric = metric
    ctx.mark_non_differentiable(logsumexp, indices)


def soft_quantize_autograd(namespace: str = NAMESPACE):
    """The backward of ``<namespace>::soft_quantize`` (tests reuse it for the reference ops)."""

    def backward(ctx, grad_out, grad_logsumexp, grad_indices):
        x, keys, values, out, logsumexp = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        op = getattr(torch.ops, namespace).soft_quantize_backward
        grad_x, grad_keys, grad_values = op(
            grad_out.contiguous(), x, keys, values, out, logsumexp, ctx.temperature, ctx.metric
        )
        return grad_x, grad_keys, grad_values, None, None

    return backward


torch.library.register_autograd(
    f"{NAMESPACE}::code_distribution",
    code_distribution_autograd(),
    setup_context=_code_distribution_setup_context,
)
torch.library.register_autograd(
    f"{NAMESPACE}::soft_quantize",
    soft_quantize_autograd(),
    setup_context=_soft_quantize_setup_context,
)
