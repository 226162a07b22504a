"""Backend selection (vqkernels.dispatch), available_backends(), explain() and
``python -m vqkernels``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vqkernels
from vqkernels import BackendUnavailableError, dispatch
from vqkernels.testing import make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_available_backends_shape():
    avail = vqkernels.available_backends()
    assert tuple(avail) == dispatch.BACKENDS == ("reference", "cpu", "cuda", "triton")
    assert all(isinstance(v, str) for v in avail.values())
    assert avail["reference"] == ""
    if torch.version.cuda is None:
        assert "no CUDA support" in avail["cuda"]
    # Per device: CPU tensors never run on the cuda backend, and the reason says so.
    on_cpu = vqkernels.available_backends("cpu")
    assert on_cpu["reference"] == "" and on_cpu["cuda"] != ""
    if not avail["cpu"] and torch.cuda.is_available():
        assert "runs on CPU tensors" in vqkernels.available_backends("cuda")["cpu"]


def test_auto_on_cpu_prefers_the_cpu_backend(monkeypatch):
    monkeypatch.delenv("VQKERNELS_BACKEND", raising=False)
    want = "cpu" if not vqkernels.available_backends("cpu")["cpu"] else "reference"
    assert dispatch.resolve("auto", torch.device("cpu")) == want
    x, cb = make_inputs(300, 50, 12, seed=0)
    auto = vqkernels.nearest_code(x, cb, return_distance=True)
    explicit = vqkernels.nearest_code(x, cb, return_distance=True, backend=want)
    assert torch.equal(auto[0], explicit[0]) and torch.equal(auto[1], explicit[1])


@pytest.mark.cuda
def test_auto_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    avail = vqkernels.available_backends("cuda")
    want = next(b for b in ("cuda", "triton", "reference") if not avail[b])
    assert dispatch.resolve("auto", torch.device("cuda")) == want


def test_env_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("VQKERNELS_BACKEND", "reference")
    assert dispatch.resolve("auto", cpu) == "reference"
    # An explicit backend= wins over the variable.
    if not vqkernels.available_backends("cpu")["cpu"]:
        assert dispatch.resolve("cpu", cpu) == "cpu"
    monkeypatch.setenv("VQKERNELS_BACKEND", "auto")
    assert dispatch.resolve("auto", cpu) in ("cpu", "reference")
    monkeypatch.setenv("VQKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="^VQKERNELS_BACKEND must be 'auto' or one of"):
        dispatch.resolve("auto", cpu)
    x, cb = make_inputs(5, 3, 2)
    with pytest.raises(ValueError, match="VQKERNELS_BACKEND"):
        vqkernels.nearest_code(x, cb)
    # The override names a backend that cannot run here: the error says why.
    unavailable = [b for b, why in vqkernels.available_backends("cpu").items() if why]
    for b in unavailable:
        monkeypatch.setenv("VQKERNELS_BACKEND", b)
        with pytest.raises(BackendUnavailableError, match=f"backend '{b}'"):
            vqkernels.nearest_code(x, cb)


def test_explain_lists_every_backend(monkeypatch):
    monkeypatch.delenv("VQKERNELS_BACKEND", raising=False)
    text = vqkernels.explain("cpu")
    first, *rest = text.splitlines()
    assert first == f"auto -> {dispatch.resolve('auto', torch.device('cpu'))} on cpu"
    avail = vqkernels.available_backends("cpu")
    assert len(rest) == len(avail)
    for line, (b, why) in zip(rest, avail.items()):
        assert line.split()[0] == b
        assert ("unavailable: " + why) in line if why else line.rstrip().endswith("available")


def test_python_m_vqkernels_lists_backends():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("VQKERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vqkernels"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"vqkernels {vqkernels.__version__}")
    assert f"torch     {torch.__version__}" in out
    assert "backends (import-level):" in out and "auto -> " in out
    for b in dispatch.BACKENDS:
        lines = [ln for ln in out.splitlines() if ln.startswith(f"  {b} ")]
        assert lines, f"backend {b} not listed:\n{out}"
        assert all("available" in ln for ln in lines)


def test_op_table_lists_every_op_on_every_backend_or_says_why():
    # One table decides which function runs each op: every public op has a reference entry, and
    # asking for a backend that lacks an op names the op and where it is implemented.
    for op, impls in dispatch.OP_TABLE.items():
        assert "reference" in impls, op
    assert dispatch.resolve("reference", torch.device("cpu"), "quantize") == "reference"
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        dispatch.resolve("auto", torch.device("cpu"), "no_such_op")
    dispatch.OP_TABLE["_only_reference"] = {"reference": lambda: "ref"}
    try:
        # auto skips backends without the op; an explicit one explains the refusal.
        assert dispatch.call("_only_reference", "auto", torch.device("cpu")) == "ref"
        if not dispatch.available_backends()["cpu"]:
            with pytest.raises(dispatch.BackendUnavailableError, match="no cpu implementation"):
                dispatch.resolve("cpu", torch.device("cpu"), "_only_reference")
    finally:
        del dispatch.OP_TABLE["_only_reference"]


def test_feature_refusal_names_the_feature(monkeypatch, cpu_backend):
    """A call using a feature (multi-head, sampling, rotation) skips backends lacking it under
    ``auto`` and an explicit backend lacking it is refused with the feature named."""
    monkeypatch.setitem(
        dispatch.OP_FEATURES, "nearest_code", {"heads": ("reference",), "sample": ("reference",)}
    )
    x = torch.randn(5, 2, 3)
    cb = torch.randn(2, 4, 3)
    assert dispatch.resolve("auto", torch.device("cpu"), "nearest_code", ("heads",)) == "reference"
    with pytest.raises(dispatch.BackendUnavailableError, match="multi-head codebooks has no cpu"):
        vqkernels.nearest_code(x, cb, backend="cpu")
    with pytest.raises(dispatch.BackendUnavailableError, match=r"Gumbel sampling .* no cpu"):
        vqkernels.nearest_code(x[:, 0], cb[0], sample_temperature=1.0, backend="cpu")
    assert vqkernels.nearest_code(x, cb).shape == (5, 2)  # auto -> reference
