"""Row-chunked codebook-softmax helpers and the rotation-trick estimator for the VQ drop-ins.

vector-quantize-pytorch (LR) materializes the full ``[N, K]`` distance matrix for its Gumbel
sampling.  Here the same math runs over chunks of rows (``O(chunk·K)`` memory, never ``N x K``).

PLAIN-PYTORCH STAND-INS (the soft terms already run on the fused codebook-softmax ops: the
cross-entropy and diversity losses on ``code_distribution`` (see ``_losses``), the Gumbel
straight-through codes on ``soft_quantize`` (see ``_codebook``)):
* ``sample_codes`` / ``topk_codes`` (Gumbel-max / top-k over LR's logits; the top-k of beam
  search has no fused op) -> ``nearest_code(..., sample_temperature=)`` of issue 10k.  The Gumbel noise is drawn per chunk from the torch generator, as LR draws it for
  the whole matrix, so the codes follow the same distribution (not the same draws).
* ``rotate_to``: the VQ layer uses ``vqkernels.quantize(..., estimator="rotation")`` (issue 10k)
  wherever LR's semantics allow; ``rotate_to`` remains for Gumbel-sampled codes, learnable
  codebooks, the in-place optimizer and the ResidualChain path (see ``VectorQuantize.forward``).

Logit kinds (``kind``): ``"neg_cdist"`` = ``-‖x - c‖`` exactly as LR's ``cdist`` computes it;
``"dot"`` = ``x·c`` (LR's cosine codebooks: inputs and codes are already L2-normalized).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import dispatch

# rows per chunk: chunk·K fp32 logits (+ noise) stay around 8 MiB
_CHUNK_ELEMS = 1 << 21


def _rows_per_chunk(k: int) -> int:
    return max(1, _CHUNK_ELEMS // max(k, 1))


def logits(x: torch.Tensor, embed: torch.Tensor, kind: str) -> torch.Tensor:
    """``x: [n, d]``, ``embed: [K, d]`` -> ``[n, K]`` logits (LR's ``dist``; higher = closer)."""
    if kind == "dot":
        return x @ embed.t()
    # LR's cdist: the clamp keeps sqrt's gradient finite at 0 (rows that coincide with a code)
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (embed * embed).sum(-1)
    if torch.is_grad_enabled() and (x.requires_grad or embed.requires_grad):
        return -(x2 + y2 - 2.0 * (x @ embed.t())).clamp(min=1e-8).sqrt()
    # without autograd (the searches): the same float ops in LR's order, (x² + y²) + (−2·x·y),
    # in place on two [n, K] buffers instead of five (memory and passes of the row chunks)
    out = x @ embed.t()
    out.mul_(-2.0).add_(x2 + y2)
    return out.clamp_(min=1e-8).sqrt_().neg_()


def _sampling_logits(lg: torch.Tensor, temperature: float, stochastic: bool) -> torch.Tensor:
    """LR's ``gumbel_sample`` logits: ``lg/τ + g`` with ``g = −log(−log U)`` (logs clamped at 1e-20
    as LR; U drawn from the torch generator for the whole chunk, row-major: LR's order) when
    ``stochastic`` and ``τ > 0``, else ``lg``."""
    if not (stochastic and temperature > 0):
        return lg
    u = torch.zeros_like(lg).uniform_(0, 1)
    return lg / temperature - torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


@torch.no_grad()
def sample_codes(x: torch.Tensor, embed: torch.Tensor, kind: str, temperature: float,
                 stochastic: bool) -> torch.Tensor:
    """LR's ``gumbel_sample`` index ``argmax`` of :func:`_sampling_logits`: ``x: [N, d]``,
    ``embed: [K, d]`` -> ``[N] int64``, over row chunks."""
    step = _rows_per_chunk(embed.shape[0])
    out = [_sampling_logits(logits(xc, embed, kind), temperature, stochastic).argmax(dim=-1)
           for xc in x.split(step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def topk_codes(x: torch.Tensor, embed: torch.Tensor, k: int, kind: str, temperature: float,
               stochastic: bool) -> torch.Tensor:
    """LR's ``gumbel_sample(topk=k)`` indices, best first: ``x: [N, d]``, ``embed: [K, d]`` ->
    ``[N, k] int64``: ``topk`` of LR's own logits (so ties and rounding pick LR's codes), over
    row chunks (``O(chunk·K)`` memory, never ``N x K``)."""
    step = _rows_per_chunk(embed.shape[0])
    out = [_sampling_logits(logits(xc, embed, kind), temperature, stochastic).topk(k, dim=-1).indices
           for xc in x.split(step)]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=x.device)


# ------------------------------------------------------------------------------ rotation trick


def _rotation_frame(xf, qf, xn):
    """``u = x/‖x‖``, ``q̂ = q/‖q‖`` (norms clamped at 1e-6: LR's safe_div), ``w = l2norm(u + q̂)``
    (eps 1e-6), ``s = ‖q‖/‖x‖`` (clamped), all fp32 ``[..., d]`` / ``[..., 1]``."""
    qn = qf.norm(dim=-1, keepdim=True)
    u = xf / xn.clamp(min=1e-6)
    qh = qf / qn.clamp(min=1e-6)
    w = F.normalize(u + qh, dim=-1, eps=1e-6)
    return u, qh, w, qn / xn.clamp(min=1e-6)


def _rowdot(a, b):
    # einsum lowers to a batched GEMV: ~15x faster on CPU than (a*b).sum(-1) or linalg.vecdot
    return torch.einsum("...d,...d->...", a, b).unsqueeze(-1)


def rowdot(a, b):
    """``[..., d] x [..., d] -> [...]`` row dot products (a batched GEMV, see ``_rowdot``)."""
    return torch.einsum("...d,...d->...", a, b)


class _RotateTo(torch.autograd.Function):
    """Forward: ``q`` (the chosen codes).  Backward (LR 1.32's ``rotate_to``, Fifty et al. 2024):
    with ``u = x/‖x‖``, ``q̂ = q/‖q‖`` (norms clamped at 1e-6 as LR's ``safe_div``),
    ``w = l2norm(u + q̂)`` and ``s = ‖q‖/‖x‖`` (all constants), LR's output is ``s·(x − 2(x·w)w +
    2(x·u)q̂)``, i.e. ``x @ M`` with ``M = s(I − 2wwᵀ + 2uq̂ᵀ)``, so
    ``grad_x = g Mᵀ = s·(g − 2w(w·g) + 2u(q̂·g))``: O(d) per row, no d x d matrix.

    Written as ``grad_x = s·g + α·x + β·q`` with per-row scalars from five row dot products
    (x·x, q·q, x·q, x·g, q·g): the unit vectors are never materialized, so backward is a few
    passes over ``[N, d]`` instead of a dozen.  With ``rx = 1/max(‖x‖, ε)``, ``rq = 1/max(‖q‖, ε)``,
    ``n = max(‖u + q̂‖, ε)`` and ``c = (u·g + q̂·g)/n = w·g``:
    ``α = rx·(2s·(q̂·g) − 2s·c/n)``, ``β = −rq·2s·c/n``.  Same clamps as LR, so the same numbers up
    to rounding.  The codes get no gradient through the output (LR detaches every code term).
    Only ``x`` and ``q`` are saved."""

    @staticmethod
    def forward(ctx, x, q):
        ctx.save_for_backward(x, q)
        # LR's value s·(x − 2(x·w)w + 2(x·u)q̂) equals q up to rounding wherever ‖x‖ >= 1e-6; below,
        # its safe_div clamp scales it towards 0 (a zero residual in a residual stack gives 0, not
        # q).  Return q exactly where it is q, and LR's value on those degenerate rows only.
        return _rotation_value(x, q)

    @staticmethod
    def backward(ctx, g):
        x, q = ctx.saved_tensors
        return _rotation_grad(x, q, g), None


def _rotation_value(x, q, return_patch=False):
    """The rotation trick's forward value: ``q``, except LR's clamped value on rows with
    ‖x‖ < 1e-6 (with ``return_patch``: also those rows' flat indices and values)."""
    out = q.clone()
    x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    tiny = (x2.float().norm(dim=-1) < 1e-6).nonzero().squeeze(-1)
    vals = o2.new_zeros(0, o2.shape[-1])  # (not a view of `out`: it would keep `out` alive)
    if tiny.numel():
        xf = x2[tiny].float()
        # Rows that are exactly 0 (a residual equal to its code, frequent in residual stacks):
        # LR's value is s·(0 − 2·0·w + 2·0·q̂) = 0 for any finite s = ‖q‖/1e-6, so they skip
        # the frame computation (same values; only the nonzero tiny rows need it).
        live = xf.ne(0).any(dim=-1).nonzero().squeeze(-1)
        vals = o2.new_zeros(tiny.shape[0], o2.shape[-1])
        if live.numel():
            xl, ql = xf[live], o2[tiny[live]].float()
            u, qh, w, s = _rotation_frame(xl, ql, xl.norm(dim=-1, keepdim=True))
            lr_value = s * (xl - 2.0 * w * _rowdot(xl, w) + 2.0 * qh * _rowdot(xl, u))
            vals[live] = lr_value.to(out.dtype)
        o2[tiny] = vals
    return (out, tiny, vals) if return_patch else out


def _rotation_grad(x, q, g):
    """``grad_x`` of the rotation trick (see :class:`_RotateTo`)."""
    xf, qf, gf = x.float(), q.float(), g.float()
    xx, qq, xq = _rowdot(xf, xf), _rowdot(qf, qf), _rowdot(xf, qf)
    xg, qgr = _rowdot(xf, gf), _rowdot(qf, gf)
    rx = 1.0 / xx.sqrt().clamp(min=1e-6)
    rq = 1.0 / qq.sqrt().clamp(min=1e-6)
    s = qq.sqrt() * rx
    ug, qg = rx * xg, rq * qgr
    n = (rx * rx * xx + rq * rq * qq + 2.0 * rx * rq * xq).clamp(min=0).sqrt().clamp(min=1e-6)
    c = (ug + qg) / n
    alpha = rx * (2.0 * s * qg - 2.0 * s * c / n)
    beta = -rq * 2.0 * s * c / n
    gx = torch.addcmul(torch.addcmul(s * gf, alpha, xf), beta, qf)
    return gx.to(x.dtype)


def rotate_to(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x, q: [..., d]`` -> the value of ``q`` with the rotation-trick gradient to ``x``."""
    return _RotateTo.apply(x, q.detach())


class _RotateToCode(_RotateTo):
    """:class:`_RotateTo` whose value is exactly ``q`` on every row (no LR clamp patch): the
    fused ``quantize`` op's convention, for rows the VQ layer rebuilds after its tie fix."""

    @staticmethod
    def forward(ctx, x, q):
        ctx.save_for_backward(x, q)
        return q.clone()


def rotate_to_code(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x, q: [..., d]`` -> exactly ``q`` with the rotation-trick gradient to ``x``."""
    return _RotateToCode.apply(x, q.detach())


def patch_rotation_value(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """LR's rotation-trick *value* on the rows of ``out`` (the fused op's output: exactly the
    codes, with the rotation gradient) whose input has ‖x‖ < 1e-6: there LR's ``safe_div`` clamp
    scales its value towards 0 (a zero residual gives 0, not the code).  The gradient is kept
    (the patch is a detached offset); other rows are returned untouched (one norm pass)."""
    d = x.shape[-1]
    x2 = x.detach().reshape(-1, d)
    tiny = (rowdot(x2, x2) < 1e-12).nonzero().squeeze(-1)
    if not tiny.numel():
        return out
    o2 = out.reshape(-1, d)
    xf, qf = x2[tiny].float(), o2[tiny].detach().float()
    u, qh, w, s = _rotation_frame(xf, qf, xf.norm(dim=-1, keepdim=True))
    lr_value = (s * (xf - 2.0 * w * _rowdot(xf, w) + 2.0 * qh * _rowdot(xf, u))).to(out.dtype)
    rows = o2[tiny]
    return o2.index_put((tiny,), rows + (lr_value - rows).detach()).reshape(out.shape)


# ------------------------------------------------------------------------------ residual stacks


class ResidualChain:
    """The inputs of a residual stack's depths, kept as a recipe instead of tensors.

    ResidualVQ (training, default estimator path) hands one to its layers: depth ``l``'s input is
    ``base − v_0 − … − v_{l−1}``, where ``v_i`` is depth ``i``'s output value, rebuilt from its
    indices and a snapshot of the codes it searched (``K x d``, smaller than the ``N x d`` codes
    when K < N; else the codes themselves are kept).  The backward replays those subtractions
    with the same float ops as the forward, so the recomputed inputs are bit-identical, and
    saves two ``N x d`` tensors per depth (input and codes) at the price of O(depth) gathers.
    """

    def __init__(self, base: torch.Tensor):
        self.base = base.detach()  # kept as given (a view of the input costs nothing)
        self.steps: list[list] = []
        self.backend = "auto"  # the layers' vqkernels backend (for the fused backward kernel)
        # Inputs replayed by the backward and kept for a later (lower) depth's backward, see
        # input(): {depth: [N, d] tensor}; each entry is taken out when its depth asks for it.
        self._replayed: dict[int, torch.Tensor] = {}

    def record(self, idx, snapshot, q, rotation: bool, backend: str = "auto"):
        """Depth ``len(steps)``: its indices + code snapshot (or its codes when K >= N); the
        rotation patch (rows with ‖x‖ < 1e-6) is added by the estimator's forward."""
        self.backend = backend
        empty = q.new_zeros(0, q.shape[-1])
        tiny = torch.zeros(0, dtype=torch.long, device=q.device)
        if snapshot is not None and snapshot.numel() < q.numel():
            self.steps.append([idx.reshape(-1), snapshot, None, rotation, tiny, empty])
        else:
            self.steps.append([None, None, q.detach().reshape(-1, q.shape[-1]), rotation, tiny, empty])

    def step(self, i: int) -> list:
        """Depth ``i``'s ``[idx, snapshot, q, rotation, tiny, vals]``.  Once its estimator ran,
        the tensors live only as that autograd node's saved tensors: autograd frees them right
        after the node's backward (depth i's recipe is needed by depths >= i only, whose
        backwards run first), so the recipes do not all stay alive until the graph is deleted;
        with ``retain_graph=True`` they stay, and a second backward works as usual."""
        step = self.steps[i]
        if isinstance(step, _NodeStep):
            idx, snapshot, q, tiny, vals = step.ctx.saved_tensors
            return [idx, snapshot, q, step.rotation, tiny, vals]
        return step

    def codes(self, i: int) -> torch.Tensor:
        idx, snapshot, q = self.step(i)[:3]
        return q if q is not None else F.embedding(idx, snapshot)

    def input(self, depth: int) -> torch.Tensor:
        """Depth ``depth``'s input ``[N, d]``: one gather and one subtraction per earlier depth
        (plus the rare rotation patch rows), the same float ops as the forward's, so the
        values are bit-identical.

        The backward asks for depths in decreasing order.  Replaying every depth from the base
        would cost L(L−1)/2 gather+subtract passes for L depths; instead a replay keeps a few
        of the inputs it passes through (every m-th depth, m = ⌈√L⌉, plus the last m−1 before
        its target) for the later requests, which then start from the nearest kept input below
        them: ~2L passes in all (RVQ 8 depths: 10 instead of 28) for at most ~m+1 extra
        ``[N, d]`` buffers, each freed when its depth takes it."""
        start = max((j for j in self._replayed if j <= depth), default=0)
        if start == depth and depth > 0:
            return self._replayed.pop(depth)
        r = self._replayed.pop(start) if start > 0 else self.base.reshape(-1, self.base.shape[-1])
        m = max(1, math.isqrt(max(len(self.steps) - 1, 0)) + 1)
        for i in range(start, depth):
            q = self.codes(i)
            rotation, tiny, vals = self.step(i)[3:]
            if rotation:
                # r − v with v = q patched on the tiny rows: subtract q everywhere, then redo
                # the tiny rows with their patched values (elementwise: the same bits as the
                # forward's r − v, without a patched copy of q)
                nr = r - q
                if tiny.numel():
                    nr[tiny] = r[tiny] - vals
                r = nr
            else:
                r = r - (r + (q - r))
            j = i + 1
            if j < depth and (j % m == 0 or j > depth - m):
                self._replayed[j] = r
        return r


class _NodeStep:
    """A chain step whose tensors are the saved tensors of its estimator's autograd node."""

    __slots__ = ("ctx", "rotation")

    def __init__(self, ctx, rotation):
        self.ctx, self.rotation = ctx, rotation


class _ChainedEstimator(torch.autograd.Function):
    """Rotation trick (or STE) + LR's commitment MSE of one residual depth, saving only the
    :class:`ResidualChain` recipe: ``(out, mse) = (value(x, q), mean((q − x)²))``; backward
    ``grad_x = R(g_out) + g_mse·2(x − q)/numel`` with ``x``, ``q`` recomputed from the chain."""

    @staticmethod
    def forward(ctx, x, q, chain, depth, rotation):
        ctx.chain, ctx.depth, ctx.rotation, ctx.shape = chain, depth, rotation, x.shape
        step = chain.steps[depth]
        if rotation:
            out, tiny, vals = _rotation_value(x, q, return_patch=True)
            step[4:] = [tiny, vals]
        else:
            out = x + (q - x)
        # the step's tensors move into this node's saved tensors (see ResidualChain.step)
        ctx.save_for_backward(step[0], step[1], step[2], step[4], step[5])
        chain.steps[depth] = _NodeStep(ctx, rotation)
        return out, F.mse_loss(q, x)

    @staticmethod
    def backward(ctx, g_out, g_mse):
        chain = ctx.chain
        x = chain.input(ctx.depth)
        if g_out is None:
            g_out = torch.zeros(ctx.shape, dtype=x.dtype, device=x.device)
        features = ("rotation",) if ctx.rotation else ()
        if dispatch.resolve(chain.backend, x.device, "quantize", features) in ("cpu", "cuda"):
            # The fused quantize backward: estimator(g) + (2·1/numel)·g_mse·(x − q) in one pass
            # over the rows, its per-row dot products in fp64 (the PyTorch formula below uses
            # fp32 ones: the two agree to fp32 rounding, amplified on near-zero residuals by
            # the rotation's ‖q‖/‖x‖ as in the fused VQ path).  Codes by index from the
            # depth's snapshot, or the saved codes themselves with the identity index.
            idx, snapshot, q = chain.step(ctx.depth)[:3]
            if idx is None:
                snapshot, idx = q, torch.arange(q.shape[0], device=q.device)
            g_loss = g_mse if g_mse is not None else x.new_zeros(())
            grad, _ = torch.ops.vqkernels.quantize_backward(
                g_out.reshape(x.shape).contiguous(), g_loss.float(), x, snapshot, idx, 1.0, False,
                "rotation" if ctx.rotation else "ste",
            )  # fmt: skip
            return grad.reshape(ctx.shape), None, None, None, None
        x = x.reshape(ctx.shape)
        q = chain.codes(ctx.depth).reshape(ctx.shape)
        grad = _rotation_grad(x, q, g_out) if ctx.rotation else g_out
        if g_mse is not None:
            grad = grad + g_mse * (2.0 / x.numel()) * (x - q)
        return grad, None, None, None, None


def chained_estimator(x, q, chain, depth, rotation):
    return _ChainedEstimator.apply(x, q.detach(), chain, depth, rotation)
