"""The one exception type users see.

Anything the user can fix (a missing file, a shape that does not match, a prompt too long for the
context) is raised as `NanoMedusaError` with one sentence that names the fix. The command-line tools
catch it and print that sentence instead of a traceback from deep inside torch.
"""


class NanoMedusaError(Exception):
    """A user-facing error: the message is one sentence that says what to do."""
