"""Backend selection: which implementation runs a call, and why the others refused.

Backends
--------
``reference``  pure PyTorch (``vqkernels.reference``); any device; always available.
``cpu``        fused C++ kernels (``vqkernels._C``, OpenMP + SIMD); CPU tensors.
``cuda``       fused CUDA C++ kernels (``vqkernels._C_cuda``); CUDA tensors; needs a CUDA build.
``triton``     Triton kernels (``vqkernels.triton``); CUDA tensors, or CPU tensors when
               ``TRITON_INTERPRET=1`` was set before triton was imported (slow; for tests).

``backend="auto"`` picks, for CUDA tensors, ``cuda`` then ``triton`` then ``reference``; for CPU
tensors ``cpu`` then ``reference`` -- skipping any backend that has no implementation of the op.

The op table
------------
:data:`OP_TABLE` is the one place that says which function runs op ``name`` on backend ``b``:
``OP_TABLE[name][b]``, all with the op's flattened signature (the one of
``vqkernels.reference.<name>``).  :func:`call` resolves the backend and runs the entry;
``vqkernels.functional`` validates and flattens, then calls it.  A new op family adds one row here
(and its kernels), never a per-op ``if backend == ...`` chain.  The environment variable ``VQKERNELS_BACKEND`` overrides
``auto`` (an explicit ``backend=`` argument wins over the variable).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (see README, 'Building')"
)


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run the call; the message says why."""


@dataclass(frozen=True)
class _Probe:
    ok: bool
    why: str  # empty when ok


_probe_cache: dict[str, _Probe] = {}
_module_cache: dict[str, ModuleType] = {}


def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError or a broken shared object: report, never crash
        return None, f"{type(exc).__name__}: {exc}"


def _probe(backend: str) -> _Probe:
    if backend in _probe_cache:
        return _probe_cache[backend]
    if backend == "reference":
        p = _Probe(True, "")
    elif backend == "cpu":
        mod, err = _import("vqkernels._C")
        if mod is None:
            p = _Probe(False, f"the C++ CPU extension vqkernels._C is not built ({err}); {_BUILD_HINT}")
        else:
            _module_cache["cpu"] = mod
            p = _Probe(True, "")
    elif backend == "cuda":
        if torch.version.cuda is None:
            p = _Probe(False, "the installed torch has no CUDA support (CPU-only wheel)")
        else:
            mod, err = _import("vqkernels._C_cuda")
            if mod is None:
                p = _Probe(
                    False,
                    f"the CUDA extension vqkernels._C_cuda is not built ({err}); with a CUDA torch and "
                    f"nvcc, {_BUILD_HINT}, or force it with VQKERNELS_BUILD_CUDA=1",
                )
            else:
                _module_cache["cuda"] = mod
                p = _Probe(True, "")
    elif backend == "triton":
        mod, err = _import("vqkernels.triton")
        if mod is None:
            p = _Probe(False, f"triton is not usable ({err}); `pip install triton`")
        else:
            _module_cache["triton"] = mod
            p = _Probe(True, "")
    else:  # pragma: no cover - guarded by validate_backend
        raise ValueError(backend)
    _probe_cache[backend] = p
    return p


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_refusal(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on tensors of ``device`` ('' when it can)."""
    if backend == "reference":
        return ""
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got {device.type} tensors"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
    if backend == "triton":
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpreting():
            return ""
        return (
            f"the triton backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before importing triton), got {device.type} tensors"
        )
    return ""


def available_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Map every backend to ``""`` when usable (on ``device`` if given) or the reason it is not."""
    out = {}
    for b in BACKENDS:
        p = _probe(b)
        why = p.why
        if p.ok and device is not None:
            why = _device_refusal(b, torch.device(device))
        out[b] = why
    return out


def validate_backend(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _op_refusal(backend: str, op: str | None, features: tuple[str, ...] = ()) -> str:
    if op is None:
        return ""
    if backend not in OP_TABLE.get(op, {}):
        have = ", ".join(OP_TABLE.get(op, {})) or "none"
        return f"op {op!r} has no {backend} implementation (implemented on: {have})"
    for feature in features:
        have = OP_FEATURES.get(op, {}).get(feature, ())
        if backend not in have:
            return (
                f"op {op!r} with {FEATURE_NAMES.get(feature, feature)} has no {backend} "
                f"implementation (implemented on: {', '.join(have) or 'none'})"
            )
    return ""


def resolve(
    backend: str, device: torch.device, op: str | None = None, features: tuple[str, ...] = ()
) -> str:
    """The backend name that runs a call on ``device`` for the requested ``backend`` (and, when
    ``op`` is given, one that implements it and every feature in ``features``, see
    :data:`OP_FEATURES`)."""
    validate_backend(backend)
    if op is not None and op not in OP_TABLE:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(OP_TABLE)}")
    if backend == "auto":
        env = os.environ.get("VQKERNELS_BACKEND", "auto") or "auto"
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(
                    f"VQKERNELS_BACKEND must be 'auto' or one of {BACKENDS}, got {env!r}"
                )
            backend = env
    if backend != "auto":
        p = _probe(backend)
        if not p.ok:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {p.why}")
        why = _device_refusal(backend, device) or _op_refusal(backend, op, features)
        if why:
            raise BackendUnavailableError(f"backend {backend!r} cannot run this call: {why}")
        return backend
    order = _AUTO_ORDER.get(device.type, ("reference",))
    for b in order:
        if _probe(b).ok and not _device_refusal(b, device) and not _op_refusal(b, op, features):
            return b
    return "reference"  # pragma: no cover - reference always qualifies


def explain(device: torch.device | str) -> str:
    """Human-readable account of which backend ``auto`` picks on ``device`` and why."""
    device = torch.device(device)
    chosen = resolve("auto", device)
    lines = [f"auto -> {chosen} on {device.type}"]
    for b, why in available_backends(device).items():
        lines.append(f"  {b:9s} {'available' if not why else 'unavailable: ' + why}")
    return "\n".join(lines)


def module(backend: str) -> ModuleType:
    """The imported module implementing ``backend`` (after a successful probe)."""
    _probe(backend)
    return _module_cache[backend]


OpFn = Callable[..., object]


def call(op: str, backend: str, device: torch.device, *args, features: tuple[str, ...] = ()):
    """Run op ``op`` with its flattened arguments on the backend ``backend`` resolves to (one that
    implements every feature the call uses)."""
    return OP_TABLE[op][resolve(backend, device, op, features)](*args)


def _triton(name: str) -> OpFn:
    # Looked up at call time: the triton module is imported only when that backend runs.
    return lambda *args: getattr(module("triton"), name)(*args)


def _torch_op(name: str) -> OpFn:
    # The C++ CPU and CUDA kernels are registered on the same schema (torch.ops.vqkernels.<name>);
    # the dispatcher routes by device.
    return lambda *args: getattr(torch.ops.vqkernels, name)(*args)


def _ref(name: str) -> OpFn:
    from . import reference

    return getattr(reference, name)


def _sig(name: str, keep: int) -> OpFn:
    # The C++ ops take every argument but the trailing ``precision`` (they always compute
    # exactly in fp32); a feature a backend lacks is refused by OP_FEATURES before the call.
    return lambda *args: getattr(torch.ops.vqkernels, name)(*args[:keep])


# op -> {backend: impl}.  Signatures (flattened, validated inputs; multi-head: x [N, H, D],
# codebook [H, K, D], indices [N, H], cluster_size [H, K]):
#   nearest_code(x, codebook, metric, sample_temperature, seed, precision) -> (indices, distance)
#   cluster_stats(x, indices, num_codes) -> (counts, sums)
#   ema_update_(codebook, cluster_size, embed_sum, x, indices, decay, eps) -> None
#   quantize(x, codebook, beta, metric, codebook_loss, estimator, precision)
#       -> (quantized, indices, loss)
#   code_distribution(x, codebook, row_weight, temperature, metric[, row_group, num_groups])
#       -> (lse, entropy, mean_probs [K] or [G, K])
#   soft_quantize(x, keys, values, temperature, metric) -> (out, lse)
OP_TABLE: dict[str, dict[str, OpFn]] = {
    "nearest_code": {
        "reference": lambda x, cb, metric, temp, seed, precision: _ref("nearest_code")(
            x, cb, metric, sample_temperature=temp, seed=seed
        ),
        "cpu": _sig("nearest_code", 5),
        "cuda": _sig("nearest_code", 5),
        "triton": lambda x, cb, metric, temp, seed, precision: _triton("nearest_code")(
            x, cb, metric, precision, temp, seed
        ),
    },
    "cluster_stats": {
        "reference": _ref("cluster_stats"),
        "cpu": _torch_op("cluster_stats"),
        "cuda": _torch_op("cluster_stats"),
        "triton": _triton("cluster_stats"),
    },
    "ema_update_": {
        "reference": _ref("ema_update_"),
        "cpu": _torch_op("ema_update_"),
        "cuda": _torch_op("ema_update_"),
        "triton": _triton("ema_update_"),
    },
    "quantize": {
        "reference": lambda x, cb, beta, metric, cl, est, precision: _ref("quantize")(
            x, cb, beta, metric, cl, est
        ),
        "cpu": _sig("quantize", 6),
        "cuda": _sig("quantize", 6),
        "triton": lambda x, cb, beta, metric, cl, est, precision: _triton("quantize")(
            x, cb, beta, metric, cl, precision, est
        ),
    },
    "code_distribution": {
        "reference": _ref("code_distribution"),
        "cpu": _torch_op("code_distribution"),
        "triton": _triton("code_distribution"),
    },
    "soft_quantize": {
        "reference": _ref("soft_quantize"),
        "cpu": _torch_op("soft_quantize"),
        "triton": _triton("soft_quantize"),
    },
}

# Features a call may use beyond the plain op, and the backends implementing each: a call using
# a feature resolves (``auto``) to the first backend in its order that implements all of them,
# and an explicit backend that lacks one is refused with this table's answer.
#   heads     multi-head codebooks [H, K, D] (x [N, H, D]) searched/updated in one call
#   sample    Gumbel-max sampling fused into the search (sample_temperature > 0)
#   rotation  the rotation-trick estimator of quantize
OP_FEATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "nearest_code": {
        "heads": ("reference", "cpu", "triton", "cuda"),
        "sample": ("reference", "cpu", "triton", "cuda"),
    },
    "cluster_stats": {"heads": ("reference", "cpu", "triton", "cuda")},
    "ema_update_": {"heads": ("reference", "cpu", "triton", "cuda")},
    "quantize": {
        "heads": ("reference", "cpu", "triton", "cuda"),
        "rotation": ("reference", "cpu", "triton", "cuda"),
    },
}
FEATURE_NAMES = {
    "heads": "multi-head codebooks",
    "sample": "Gumbel sampling (sample_temperature > 0)",
    "rotation": "estimator='rotation'",
}
