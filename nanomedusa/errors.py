"""The exception types users see.

Anything the user can fix (a missing file, a shape that does not match, a prompt too long for the
context) is raised as `NanoMedusaError` with one sentence that names the fix. The kernels below the
application raise their own `KernelInputError` (kernels/errors.py: `kernels/` imports nothing from
here) for an input a kernel cannot take, say a model wider than the Triton RMSNorm handles; its message
names the fix too. `USER_ERRORS` is both: the command-line tools catch it and print that sentence
instead of a traceback from deep inside torch.
"""

from kernels.errors import KernelInputError


class NanoMedusaError(Exception):
    """A user-facing error: the message is one sentence that says what to do."""


USER_ERRORS = (NanoMedusaError, KernelInputError)
