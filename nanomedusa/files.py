"""Reading and writing files the user gives or keeps: UTF-8 text with a clear error, and writes that never tear.

`check_utf8` is the same check for text that arrives as a Python string: from the command line, a pipe, or a JSON
escape.

`write_atomically` writes to a temporary file beside the target and renames it over the target
(`os.replace`, atomic on POSIX and Windows), so a run killed mid-write leaves the previous file whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import NanoMedusaError


def read_utf8(path: str | Path) -> str:
    """The text of `path` (without the byte-order mark some editors put first), or one sentence naming the first
    byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise NanoMedusaError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                              f"re-save it as UTF-8.") from None


def check_utf8(what: str, text: str, fix: str = "pass UTF-8 text") -> None:
    """`text` must encode as UTF-8, as no tokenizer takes a lone surrogate: Python keeps each byte b of command-line
    or piped input that is not UTF-8 as U+DC00 + b, and JSON can escape half a surrogate pair ("\\ud83d")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise NanoMedusaError(f"{what} is not valid UTF-8 ({found} at character {e.start}); {fix}.") from None


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path), then move the result over `path` in one step. The temporary name is the
    process's own, so processes writing the same file (ranks sharing a hidden-state cache) never mix their bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # (Ctrl-C too: a name of its own is never overwritten by the next save, so remove it)
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
