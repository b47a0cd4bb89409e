"""How the benchmarks report: progress lines, markdown tables, the run's metadata, and the JSON results file.

The tables print as each part finishes; the JSON file holds every raw number and is rewritten after each
part, so that a long run that fails late keeps what it measured. A benchmark that writes without being told where
writes under DEFAULT_OUT, never over the records of past GPU runs that bench/ keeps in git.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime
from pathlib import Path

import torch

import kernels

# Where a benchmark's JSON goes when no --json names a file: the repository's work/ folder, which git ignores (as
# bench/gpu_run.sh's WORK), so that a run never overwrites a tracked result such as bench/step-times.json.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "work" / "bench"


def say(message: str) -> None:
    print(message, flush=True)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    """A markdown table, columns padded to line up in a terminal."""
    cells = [headers] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    say(f"\n### {title}\n")
    say(line(cells[0]))
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        say(line(row))
    say("")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def metadata(args, device: torch.device, dtype: torch.dtype) -> dict:
    """The machine, the versions, the date, the kernel settings in force and every flag of the run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "dtype": str(dtype).removeprefix("torch."),
            "kernels": kernels.get_backend(), "row_invariant": kernels.row_invariant(),
            "dependent_launch": kernels.dependent_launch_enabled(),
            "args": json.loads(json.dumps(vars(args), default=str))}  # paths (--sampling's too) as strings


def save(results: dict, path: str | Path) -> None:
    """Write `results` as JSON to `path` (its directory created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2) + "\n")


def _json_safe(value):
    """JSON has no inf or NaN (a failed check's error is inf): write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
