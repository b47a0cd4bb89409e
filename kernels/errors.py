"""The kernels' one exception: an input a kernel cannot take (a shape, dtype, layout or mode it does not handle).

`kernels/` imports nothing from the application above it, so it has its own type. Like the application's
own error, its message is one sentence that names the fix, and the command-line tools print it the same way:
one `error: ...` line, no traceback.
"""


class KernelInputError(ValueError):
    """An input a kernel cannot take: the message is one sentence that says what to do."""
