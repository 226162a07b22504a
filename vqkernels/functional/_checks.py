"""Argument checks shared by the public functions (errors name the argument and the expected
shape/dtype/device), the value checks behind ``check_inputs`` and the flattening helpers."""

from __future__ import annotations

import os

import torch

from ..reference.sampling import MAX_SEED

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_METRICS = ("l2", "cosine")
_PRECISIONS = ("exact", "fast")


# ------------------------------------------------------------------------------------ checks


def _default_check() -> bool:
    return os.environ.get("VQKERNELS_CHECK_INPUTS", "1") not in ("0", "false", "False", "")


def _want_check(check_inputs: bool | None) -> bool:
    if torch.compiler.is_compiling():
        return False
    return _default_check() if check_inputs is None else bool(check_inputs)


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {t.dtype} (shape {tuple(t.shape)})"
        )


def _check_x(x, d_name: str = "x") -> torch.Tensor:
    x = _require_tensor(d_name, x)
    _require_float(d_name, x)
    if x.dim() < 1:
        raise ValueError(f"{d_name} must have shape [..., D] with at least 1 dim, got a 0-d tensor")
    return x


def _check_codebook(codebook, x: torch.Tensor | None, same_dtype: bool) -> torch.Tensor:
    """``codebook: [K, D]`` (x: ``[..., D]``) or multi-head ``[H, K, D]`` (x: ``[..., H, D]``)."""
    codebook = _require_tensor("codebook", codebook)
    _require_float("codebook", codebook)
    if codebook.dim() not in (2, 3):
        raise ValueError(
            f"codebook must have shape [K, D] (or [H, K, D] for one codebook per head), got shape "
            f"{tuple(codebook.shape)}"
        )
    k, d = codebook.shape[-2:]
    if k < 1 or d < 1 or codebook.shape[0] < 1:
        raise ValueError(
            f"codebook must have K >= 1 codes of D >= 1 dims (and H >= 1 heads), got shape "
            f"{tuple(codebook.shape)}"
        )
    if x is not None:
        if x.shape[-1] != d:
            raise ValueError(
                f"x has last dim D={x.shape[-1]} but codebook has D={d} "
                f"(x shape {tuple(x.shape)}, codebook shape {tuple(codebook.shape)})"
            )
        if codebook.dim() == 3:
            h = codebook.shape[0]
            if x.dim() < 2 or x.shape[-2] != h:
                raise ValueError(
                    f"a multi-head codebook [H={h}, K={k}, D={d}] needs x of shape [..., {h}, {d}] "
                    f"(head h is searched in codebook[h]), got x shape {tuple(x.shape)}"
                )
        if x.device != codebook.device:
            raise ValueError(f"x is on {x.device} but codebook is on {codebook.device}")
        if same_dtype and x.dtype != codebook.dtype:
            raise TypeError(
                f"x ({x.dtype}) and codebook ({codebook.dtype}) must have the same dtype; "
                f"cast one of them (e.g. codebook.to(x.dtype))"
            )
    return codebook


def _flatten_heads(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [N, D]`` for one codebook, ``[..., H, D] -> [N, H, D]`` for H heads."""
    if codebook.dim() == 3:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    return _flatten(x)


def _check_sampling(sample_temperature, generator, seed) -> tuple[float, int]:
    """Validated temperature and the noise seed (drawn from ``generator`` when sampling and no
    explicit seed is given; 0 when not sampling)."""
    if isinstance(sample_temperature, bool) or not isinstance(sample_temperature, (int, float)):
        raise TypeError(f"sample_temperature must be a float >= 0, got {sample_temperature!r}")
    temp = float(sample_temperature)
    if not temp >= 0.0 or temp == float("inf"):
        raise ValueError(f"sample_temperature must be a finite float >= 0, got {sample_temperature!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2^63) or None, got {seed!r}")
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
    if temp == 0.0:
        return 0.0, 0
    if seed is None:
        # One draw per call from the torch generator (the default one when None): the noise of
        # every (row, code) pair is then a pure function of this seed (counter-based, see
        # vqkernels.reference.sampling), identical on every backend and thread count.
        seed = int(torch.randint(0, MAX_SEED, (), generator=generator, dtype=torch.int64))
    return temp, int(seed)


def _check_metric(metric) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


def _check_precision(precision) -> str:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    return precision


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s); pass finite values "
            f"(or check_inputs=False for the documented unchecked behaviour)"
        )


def _check_indices(indices, n: int, k: int, device: torch.device, check_values: bool) -> torch.Tensor:
    indices = _require_tensor("indices", indices)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}")
    if indices.numel() != n:
        raise ValueError(
            f"indices must have one entry per row of x ({n}), got shape {tuple(indices.shape)}"
        )
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but x is on {device}")
    indices = indices.reshape(n).to(torch.int64)
    if check_values and n:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= k:
            raise ValueError(
                f"indices must lie in [-1, {k}) (-1 = ignored row), got values in [{lo}, {hi}]"
            )
    return indices


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
