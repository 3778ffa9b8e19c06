"""User-facing errors: one line, naming the offending value and the fix."""


class MamballamaError(Exception):
    """An error caused by the user's input or environment. The CLI prints it as one line and exits 1."""

    exit_code = 1


class UsageError(MamballamaError):
    """Bad option values (exit code 2, like a usage error)."""

    exit_code = 2
