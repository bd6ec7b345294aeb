"""The one error module: user errors carry their exit code and a message that says what to do."""


class MemdiagError(Exception):
    """A failure memdiag reports in one line; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(MemdiagError):
    """Bad input from the user (arguments, overrides, files): exit code 2."""

    exit_code = 2
