"""What the command lines share: one-line errors, and the checks of flag values and paths.

Each CLI (generate.py, train.py, `python -m nanomedusa.tree_tuning`, the benchmarks' `python -m bench.decode`)
parses its flags with `ArgumentParser` and checks them all in one function right after parsing, built from
the checks here, before anything slow (a model load) starts. A bad value is a `NanoMedusaError` sentence that
names the fix; the CLI ends in `run_reporting_errors`, which prints it (or a kernel's `KernelInputError`) as
one `error: ...` line and exits with status 2, argparse's code for a usage error.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

import kernels
from kernels.interpreter import interpreting
from kernels.tree_attention import MAX_ROW_INVARIANT_TREE, TAIL_GRAIN

from .chat_template import PRESETS
from .errors import USER_ERRORS, NanoMedusaError
from .files import check_utf8
from .sampling import MIN_TEMPERATURE

USAGE_ERROR = 2  # exit status for anything the user can fix
BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)  # the status a shell gives a tool SIGPIPE ended (13: POSIX's)
INTERRUPTED = 128 + signal.SIGINT  # and one Ctrl-C ended


def run_reporting_errors(body: Callable[[], object]) -> int:
    """Every CLI's ending: run `body`; a user's error (`USER_ERRORS`) becomes one `error: ...` line and
    USAGE_ERROR, and so does running out of GPU memory. A reader of stdout that went away (`| head`) ends the run
    quietly, as it ends a Unix tool, and so does Ctrl-C, with the status a shell gives a tool SIGINT ended."""
    try:
        body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except torch.OutOfMemoryError as e:
        first = ". ".join(str(e).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0 has ..."
        print(f"error: {first}; ask for less memory (a shorter context or sequence, fewer new tokens, a smaller "
              f"batch or tree), or use a smaller model or dtype.", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:
        # Python flushes stdout once more at exit, which would raise again: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except KeyboardInterrupt:  # (a chat's Ctrl-C stops an answer and never reaches here: nanomedusa/chat.py)
        print(file=sys.stderr)  # the shell's prompt then starts a line of its own, not after the partial text
        return INTERRUPTED  # (`exit_with` then ends the process by SIGINT)
    return 0


def exit_with(status: int) -> None:
    """A CLI's last call, with `run_reporting_errors`' status. After Ctrl-C (INTERRUPTED) the process ends by SIGINT
    itself, as Python ends it when nothing catches KeyboardInterrupt: a shell running the CLI in a loop or a list of
    commands stops there only for a process SIGINT ended, not for one that exited with 130."""
    if status == INTERRUPTED and os.name == "posix":
        atexit._run_exitfuncs()  # what Python does before it ends by SIGINT itself: exit handlers, then stdio flushed
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone, a stream closed: nothing more to keep
                pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(status)


def add_chat_format_flag(p: argparse.ArgumentParser) -> None:
    """--chat-format, for every CLI that renders conversations (generate.py, train.py, tree tuning, calibration):
    the heads must be trained, tuned and served on prompts of one format."""
    p.add_argument("--chat-format", default="auto", choices=("auto", *PRESETS),
                   help="how messages are marked up: auto (the preset that the checkpoint's chat_template matches, "
                        "nanomedusa/chat_template.py) or a preset by name, for a checkpoint without a template")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default (a list as the flag takes it, space-separated), flags without help
    included, except where the flag's help already says it, the flag is a switch (default False), or the default
    is None or empty (what happens then is in the help), which would print a contradicting "(default: None)"."""

    @staticmethod
    def _default_note(action) -> str | None:
        """'(default: ...)' for the action's default, or None where it has none worth printing."""
        value = action.default
        if value is None or value is False or value is argparse.SUPPRESS or value in ("", [], ()):
            return None
        shown = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return f"(default: {shown})".replace("%", "%%")  # (argparse %-formats help text)

    def _get_help_string(self, action):
        text, note = action.help or "", self._default_note(action)
        return text if note is None or "default" in text else f"{text} {note}"

    def _format_action(self, action):
        if not action.help and action.option_strings and (note := self._default_note(action)):
            action = copy.copy(action)  # (argparse prints no help line, so no default, for a flag without help)
            action.help = note
        return super()._format_action(action)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter, with the description printed as written (a module docstring's layout kept)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose --help gives each flag's default (HelpFormatter, unless another formatter is passed) and
    whose own errors (an unknown flag, a value that is not a number) are one line too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {message}; see --help.\n")


def check_at_least(minimum: float, flags: dict[str, float | None]) -> None:
    """Each flag's value (None: not given) must be a finite number >= minimum."""
    for flag, value in flags.items():
        if value is not None and not (math.isfinite(value) and value >= minimum):
            finite = "" if value < minimum else "a finite number of "  # (inf and nan are not below it)
            raise NanoMedusaError(f"{flag} must be {finite}at least {minimum}, not {value}; pass {minimum} or more.")


def check_positive(flags: dict[str, float | None]) -> None:
    """Each flag's value (None: not given) must be a finite number > 0."""
    for flag, value in flags.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            finite = "" if value <= 0 else "a finite number "
            raise NanoMedusaError(f"{flag} must be {finite}above 0, not {value}; pass a positive number.")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:  # distillation derives per-prompt seeds from it, which must fit 64 bits
        raise NanoMedusaError(f"--seed must be in 0 .. {2**32 - 1}, not {seed}.")


def check_held_out_split(eval_fraction: float | None, seed: int | None) -> None:
    """--eval-fraction and --seed of a tool that reads the held-out split train.py made (tree_tuning, calibration),
    where given (None: the heads' own)."""
    if eval_fraction is not None and not 0 < eval_fraction < 1:
        raise NanoMedusaError(f"--eval-fraction must be in (0, 1), not {eval_fraction}; pass the one the heads "
                              f"were trained with, or leave it out to take theirs.")
    if seed is not None:
        check_seed(seed)


def check_sampling(temperature: float, top_p: float, top_k: int = 0) -> None:
    """--temperature >= 0 (0 = greedy), --top-p in (0, 1] (1 = off), --top-k >= 0 (0 = off)."""
    check_at_least(0, {"--temperature": temperature, "--top-k": top_k})
    if 0 < temperature < MIN_TEMPERATURE:
        raise NanoMedusaError(f"--temperature {temperature} is too small to divide logits by; pass 0 for greedy "
                              f"decoding, or at least {MIN_TEMPERATURE}.")
    if not 0 < top_p <= 1:  # top-p 0 would drop even the likeliest token
        raise NanoMedusaError(f"--top-p must be in (0, 1] (1 = off), not {top_p}; pass e.g. 0.9.")


def check_text(flag: str, text: str | None) -> None:
    """Text from the command line must be UTF-8 (None: not given)."""
    if text is not None:
        check_utf8(flag, text)


def check_input_file(flag: str, path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        raise NanoMedusaError(f"{flag} {path} is a directory; pass a file.")
    if not path.is_file():
        raise NanoMedusaError(f"{flag} {path} does not exist; check the path.")


def check_input_dir(flag: str, path: str | Path | None) -> None:
    if path == "":  # (Path("") is the current directory)
        raise NanoMedusaError(f"{flag} is empty; pass a directory.")
    if path is not None and not Path(path).is_dir():
        raise NanoMedusaError(f"{flag} {path} is not a directory; check the path.")


def check_output_dir(flag: str, path: str | Path) -> None:
    """A directory to write into: it, or its first existing parent, must be a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NanoMedusaError(f"{flag} {path} is a file; pass a directory (it is created if missing).")
    _check_parent(flag, path)


def check_output_file(flag: str, path: str | Path) -> None:
    """A file to write: not a directory, with a directory (or a place for one) above it."""
    path = Path(path)
    if path.is_dir():
        raise NanoMedusaError(f"{flag} {path} is a directory; pass a file path, e.g. {path / 'answers.jsonl'}.")
    _check_parent(flag, path)


def _check_parent(flag: str, path: Path) -> None:
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NanoMedusaError(f"{flag} {path} lies under {parent}, which is a file; pass a path under a directory.")


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """--kernels and --exact, as generate.py and bench/decode.py take them (`use_kernels` applies them)."""
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (default: Triton on a GPU, torch on a CPU)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                   help="row-invariant kernels, so that greedy Medusa gives plain greedy's text bit for bit in any "
                        "dtype (default: on with the Triton kernels on an NVIDIA Hopper or datacenter Blackwell GPU, "
                        "where they are also the fastest, for trees they take; off elsewhere; README, 'Exact greedy')")


def check_kernels(backend: str, device: torch.device, exact: bool | None = None) -> None:
    """--kernels triton on a CPU runs the kernels in Triton's interpreter, which must be on from the start;
    --exact (given: True; None is the default, never refused) changes the Triton kernels only."""
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise NanoMedusaError("--kernels triton needs a CUDA GPU, or on a CPU Triton's interpreter: set "
                              "TRITON_INTERPRET=1 (slow, for checking kernels), or use --kernels torch or auto.")
    if exact and (backend == "torch" or backend == "auto" and device.type != "cuda"):
        fix = ("drop --kernels torch" if device.type == "cuda" else
               "on a CPU pass --kernels triton with TRITON_INTERPRET=1 (slow, for checking kernels), or drop --exact")
        raise NanoMedusaError(f"--exact needs the Triton kernels, but --kernels {backend} on {device.type} runs the "
                              f"torch ones; {fix}.")


def exact_by_default(backend: str, device: torch.device) -> bool:
    """What --exact is when not given: on where the row-invariant kernels were measured to cost nothing, the
    Triton kernels on an NVIDIA Hopper GPU or its datacenter successor (sm_90, sm_100: there every kernel of a
    step launches while the one before it ends, kernels/dependent_launch.py, and on an H200 that decoded faster
    than cuBLAS: README, 'Exact greedy'); off elsewhere (older GPUs lack that launch, and consumer Blackwell's
    smaller shared memory may not hold the tiles tuned on Hopper). `exact_fits` may still turn it off."""
    return (backend != "torch" and device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def exact_fits(num_nodes: int, depth: int) -> bool:
    """Whether the row-invariant mode takes a tree of `num_nodes` nodes, `depth` deep: kernels/tree_attention.py's
    limits. Where it does not, --exact left at its default turns off."""
    return num_nodes <= MAX_ROW_INVARIANT_TREE and depth < TAIL_GRAIN


def drop_default_exact_beyond_reach(exact: bool | None, num_nodes: int, depth: int) -> str | None:
    """After the heads and their tree are known: --exact left at its default (None) and on, but beyond what its
    kernels take (`exact_fits`), turns off. Returns the note saying so, or None when nothing changed."""
    if exact is not None or not kernels.row_invariant() or exact_fits(num_nodes, depth):
        return None
    kernels.set_row_invariant(False)
    return (f"--exact is off: its kernels take trees of at most {MAX_ROW_INVARIANT_TREE} nodes, at most "
            f"{TAIL_GRAIN - 1} deep, and this one has {num_nodes} nodes, {depth} deep")


def use_kernels(backend: str, exact: bool | None, device: torch.device) -> None:
    """Apply --kernels and --exact (checked by `check_kernels`; None: `exact_by_default`) for the rest of the
    process."""
    kernels.set_backend(backend)
    kernels.set_row_invariant(exact_by_default(backend, device) if exact is None else exact)
