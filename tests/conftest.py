"""Shared fixtures: the backend parametrization, the hypothesis profiles, the Triton interpreter.

Backends are tested through the public API (``vqkernels.<op>(..., backend=name)``) on the device
they run on: ``reference`` and ``cpu`` on CPU tensors; ``triton`` on CUDA tensors, or on CPU
tensors under the Triton interpreter when there is no GPU (marker ``interpret``: slow, so those
cases use tiny shapes); ``cuda`` on CUDA tensors (marker ``cuda``).  A backend that is not
available is skipped with the reason ``vqkernels.available_backends(device)`` gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The Triton interpreter must be chosen BEFORE triton is imported (vqkernels probes its Triton
# backend at import), so this runs before anything imports vqkernels.  ``import torch`` does not
# import triton.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import vqkernels  # noqa: E402

# ------------------------------------------------------------------------- hypothesis profiles

# deadline=None: the first call of a shape may compile (Triton) or warm up caches.  The backend
# fixture is a pure parameter (no state), so reusing it across examples is safe.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
else:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# ---------------------------------------------------------------------------------- backends

#: Largest N·K·D (and N·D) a test may hand to the Triton interpreter on CPU.
INTERPRET_BUDGET = 200_000


@dataclass(frozen=True)
class Backend:
    """A backend under test and the device its inputs live on."""

    name: str
    device: torch.device

    @property
    def interpreted(self) -> bool:
        """True for Triton kernels run by the (slow) CPU interpreter."""
        return self.name == "triton" and self.device.type == "cpu"

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"

    def require_small(self, n: int, k: int, d: int) -> None:
        """Skip cases too large for the Triton interpreter (they run on the GPU instead)."""
        if self.interpreted and max(n * k * d, n * d) > INTERPRET_BUDGET:
            pytest.skip(f"N{n}-K{k}-D{d} too large for the Triton CPU interpreter (GPU CI runs it)")

    def __str__(self) -> str:
        return f"{self.name}@{self.device.type}"


def _backend_params():
    interpret = pytest.mark.interpret
    cuda = pytest.mark.cuda
    params = [
        pytest.param(("reference", "cpu"), id="reference"),
        pytest.param(("cpu", "cpu"), id="cpu"),
    ]
    if HAS_CUDA:
        params += [
            pytest.param(("triton", "cuda"), id="triton", marks=cuda),
            pytest.param(("cuda", "cuda"), id="cuda", marks=cuda),
            pytest.param(("reference", "cuda"), id="reference-cuda", marks=cuda),
        ]
    else:
        params += [
            pytest.param(("triton", "cpu"), id="triton", marks=interpret),
            pytest.param(("cuda", "cuda"), id="cuda", marks=cuda),
        ]
    return params


def get_backend(name: str, device: str) -> Backend:
    """The :class:`Backend`, or skip the test with the reason it is unavailable."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA GPU on this machine")
    why = vqkernels.available_backends(device)[name]
    if why:
        pytest.skip(f"backend {name!r} unavailable on {device}: {why}")
    return Backend(name, torch.device(device))


@pytest.fixture(params=_backend_params())
def backend(request) -> Backend:
    """Every backend (skipped with the reason when unavailable), on its device."""
    return get_backend(*request.param)


@pytest.fixture
def cpu_backend() -> Backend:
    """The C++ CPU backend (skipped with the reason when not built)."""
    return get_backend("cpu", "cpu")


@pytest.fixture
def restore_threads():
    """Restore torch's intra-op thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
