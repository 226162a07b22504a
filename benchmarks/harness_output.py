"""Benchmark results: run metadata (machine, versions, commit, load) and the files every benchmark
writes (``<name>.json/.csv/.md/.png``) plus the console tables.  Split out of :mod:`harness`,
which re-exports every name, so ``harness.write_results`` & co. keep working."""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """Raised by a factory when its provider cannot run here; the message is the recorded reason."""


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        return ""


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
        return str(getattr(m, "__version__", "unknown"))
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metadata(device: str = "cpu", **extra: Any) -> dict[str, Any]:
    """Machine, library versions, git commit and run settings, recorded with every result."""
    meta: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "faiss": _version("faiss"),
        "vector_quantize_pytorch": _version("vector_quantize_pytorch"),
        "device": device,
    }
    try:
        import vqkernels

        meta["vqkernels"] = vqkernels.__version__
        meta["vqkernels_backends"] = {
            b: (why or "available") for b, why in vqkernels.available_backends().items()
        }
        # The built extension can differ from the commit (uncommitted sources in a shared
        # checkout): record which binary was measured.
        import hashlib

        for so in sorted(Path(vqkernels.__file__).parent.glob("_C*.so")):
            st = so.stat()
            meta.setdefault("vqkernels_binaries", {})[so.name] = {
                "mtime_utc": _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "sha256_12": hashlib.sha256(so.read_bytes()).hexdigest()[:12],
            }
    except Exception as exc:
        meta["vqkernels"] = f"unavailable ({type(exc).__name__}: {exc})"
    if _is_cuda(device) and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    meta.update(extra)
    return meta


# ---------------------------------------------------------------------------------------------
# Output: files, table, plot
# ---------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    return str(o)


def write_results(
    name: str, rows: list[dict[str, Any]], meta: dict[str, Any], out: Path | None, **extra: Any
) -> list[Path]:
    """Write ``<out>/<name>.json`` (meta + rows + extra sections) and ``<out>/<name>.csv``.

    Returns the written paths (none when ``out`` is None).
    """
    if out is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out / f"{name}.json", out / f"{name}.csv"
    with open(jpath, "w") as f:
        json.dump({"meta": meta, **extra, "rows": rows}, f, indent=1, default=_json_default)
        f.write("\n")
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    meta_cols = {"commit": meta.get("commit", ""), "torch": meta.get("torch", "")}
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + list(meta_cols))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: _fmt_csv(r.get(k)) for k in keys}, **meta_cols})
    return [jpath, cpath]


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=_json_default)
    return v


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_table(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    markdown: bool = False,
) -> str:
    """Fixed-width text table (or a Markdown table) of ``columns`` of ``rows`` ('-' for None)."""
    rows = list(rows)
    headers = list(headers or columns)
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    return "\n".join(lines)


def write_markdown(
    name: str, out: Path | None, meta: dict[str, Any], sections: list[tuple]
) -> Path | None:
    """``<out>/<name>.md``: a header with the run's settings and one Markdown table per
    ``(title, rows, columns)`` section (for the README)."""
    if out is None:
        return None
    path = Path(out) / f"{name}.md"
    lines = [
        f"<!-- generated by benchmarks/{name}; {meta.get('date_utc')} -->",
        f"Machine: {meta.get('cpu')} ({meta.get('cpu_count')} cores, torch threads "
        f"{meta.get('torch_threads')}){', GPU ' + str(meta['gpu']) if meta.get('gpu') else ''}; "
        f"torch {meta.get('torch')}, faiss {meta.get('faiss')}, triton {meta.get('triton')}; "
        f"commit {str(meta.get('commit'))[:10]}{' (dirty)' if meta.get('commit_dirty') else ''}; "
        f"{meta.get('date_utc')}.",
        "",
    ]
    for title, rows, columns in sections:
        lines += [f"**{title}**", "", format_table(rows, columns, markdown=True), ""]
    path.write_text("\n".join(lines))
    return path


MEMORY_SECTION_COLUMNS = ["case", "provider", "extra_mib", "reason"]
# The leading columns of every timing table on the console (a bench appends its own checks).
TIMING_COLUMNS = ["case", "provider", "median_ms", "p20_ms", "p80_ms", "repeats"]
# The memory table on the console: the status says why a row has no number.
MEMORY_TABLE_COLUMNS = ["case", "provider", "extra_mib", "status", "reason"]


def print_op_tables(
    rows: list[dict[str, Any]],
    time_columns: Sequence[str],
    summary_title: str,
    summary: list[dict[str, Any]],
    summary_columns: Sequence[str],
    mem_rows: list[dict[str, Any]],
    mem_columns: Sequence[str] = MEMORY_TABLE_COLUMNS,
) -> None:
    """The console end of an op benchmark: the timing rows, the vqkernels summary under its
    title, then the memory rows when any were measured (the .md file holds the same tables)."""
    print()
    print(format_table(rows, time_columns))
    print(f"\n{summary_title}")
    print(format_table(summary, summary_columns))
    if mem_rows:
        print()
        print(format_table(mem_rows, mem_columns))


def save_op_results(
    name: str,
    args: argparse.Namespace,
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    mem_rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    *,
    label: str,
    time_section: tuple[str, list[str]],
    summary_section: tuple[str, list[str]],
) -> None:
    """Everything an op benchmark writes at the end of a run, in one place: ``<name>.json/.csv``
    (rows + memory rows + summary), the PNG of the timing rows (titled ``label``, the device and
    thread count, and the commit), ``<name>.md`` with the timing, summary and memory tables, and
    a ``wrote PATH`` line per file.  Nothing is written when ``args.out`` is None (``--quick``)."""
    out = args.out
    written: list[Path | None] = list(
        write_results(name, rows + mem_rows, meta, out, summary=summary)
    )
    if out is not None:
        where = meta["cpu"] if meta.get("device", "cpu") == "cpu" else meta.get("gpu")
        written.append(
            plot_rows(
                rows,
                Path(out) / f"{name}.png",
                title=f"{label}, {where}, {args.threads} threads (commit {meta['commit'][:8]})",
            )
        )
    written.append(
        write_markdown(
            name,
            out,
            meta,
            [
                (time_section[0], rows, time_section[1]),
                (summary_section[0], summary, summary_section[1]),
                ("Peak extra memory (MiB)", mem_rows, MEMORY_SECTION_COLUMNS),
            ],
        )
    )
    for pth in written:
        if pth is not None:
            print(f"wrote {pth}")


def plot_rows(
    rows: list[dict[str, Any]],
    path: Path | None,
    *,
    case_key: str = "case",
    value_key: str = "median_ms",
    lo_key: str | None = "p20_ms",
    hi_key: str | None = "p80_ms",
    title: str = "",
    ylabel: str = "time per call (ms, median; bars 20-80 %)",
    log: bool = True,
) -> Path | None:
    """Grouped bar chart: one group per ``case_key`` value, one bar per provider (rows with a
    value only), error bars from ``lo_key``/``hi_key``; saved as PNG with the Agg backend."""
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get(value_key) is not None]
    cases = list(dict.fromkeys(r[case_key] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    if not cases:
        return None
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(cases) + 2), 4.8))
    for j, p in enumerate(providers):
        xs, ys, err_lo, err_hi = [], [], [], []
        for i, c in enumerate(cases):
            r = next((r for r in ok if r[case_key] == c and r["provider"] == p), None)
            if r is None:
                continue
            v = float(r[value_key])
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v)
            lo = r.get(lo_key) if lo_key else None
            hi = r.get(hi_key) if hi_key else None
            err_lo.append(max(v - float(lo), 0.0) if lo is not None else 0.0)
            err_hi.append(max(float(hi) - v, 0.0) if hi is not None else 0.0)
        ax.bar(xs, ys, width=width, label=p, yerr=[err_lo, err_hi], capsize=2)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=15, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
