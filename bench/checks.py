"""The flag checks the benchmarks share, beside nanomedusa/cli.py's: each turns a bad value into one
`NanoMedusaError` sentence naming the fix, so that a benchmark's `check_args` refuses it before anything slow
(a model load, a timing) starts; the CLI's `run_reporting_errors` prints it as one `error:` line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from nanomedusa.cli import check_at_least, check_output_file
from nanomedusa.errors import NanoMedusaError
from nanomedusa.files import read_utf8


def int_list(flag: str, text: str, minimum: int, what: str = "whole numbers", example: str = "16,32,64") -> list[int]:
    """A comma-separated list of whole numbers, each at least `minimum` (--budgets 16,32,64), as ints in the order
    given: what every benchmark's list flags take, parsed once here rather than by a bare int() after a model load."""
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise NanoMedusaError(f"{flag} {text!r} is not a comma-separated list of {what}; pass e.g. {example}.")
    values = [int(t) for t in text.split(",")]
    check_at_least(minimum, {flag: min(values)})
    return values


def require_cuda(tool: str, without: str = "") -> None:
    """A benchmark that times a GPU refuses a machine without one, after its other flags were checked (so that they
    are checked on a CPU too); `without` says what runs there instead, if anything."""
    if not torch.cuda.is_available():
        raise NanoMedusaError(f"bench.{tool} times CUDA kernels; run it on a GPU machine{without}.")


def check_kernel_benchmark(tool: str, smoke: bool, flag: str, out: str | None) -> None:
    """A kernel benchmark's output file (`flag`, `out`; None: none) and machine before anything runs: a GPU, or for
    its --smoke run a GPU or, on a CPU, Triton's interpreter (bench.tree_attention, bench.linear)."""
    if out is not None:
        check_output_file(flag, out)
    smoke_run = f"TRITON_INTERPRET=1 python -m bench.{tool} --smoke"
    if not smoke:
        require_cuda(tool, f" (without one: {smoke_run})")
    elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise NanoMedusaError(f"the smoke run on a CPU needs Triton's interpreter; run {smoke_run}.")


def heads_config_json(heads_dir: str | Path) -> dict | None:
    """The heads' config.json as a dict, read alone (no weights, no model), or None where it is not a readable JSON
    object: what a tool checks of its --heads before anything slow (loading the heads later names a fault in full)."""
    try:
        config = json.loads(read_utf8(Path(heads_dir) / "config.json"))
    except (OSError, ValueError):  # missing, not UTF-8, not JSON
        return None
    return config if isinstance(config, dict) else None


def heads_read_path(heads_dir: str | Path) -> bool | None:
    """Whether the heads in `heads_dir` read their path (`reads_path` in their config.json), so that a tool for one
    kind of heads refuses the other before a model loads; None where the config cannot be read."""
    config = heads_config_json(heads_dir)
    return None if config is None else bool(config.get("reads_path"))
