"""The one exception type the CLI turns into a one-line message and an exit code."""


class OptDeusError(Exception):
    """A problem the user can fix; the message says what it is and what to do.

    exit_code 2 = bad usage (arguments, recipe), 1 = runtime (input data, I/O).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(OptDeusError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)
