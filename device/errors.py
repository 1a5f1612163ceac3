"""The one user-facing error type, shared by the host CLI and the device runtime.

Library code raises ``ToolkitError``; only the command-line boundaries catch it, print the
message without a traceback and exit with its code.
"""


class ToolkitError(Exception):
    """A problem the user can act on: says what was expected, what was found, what to do."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ToolkitError):
    """A configuration file or flag that does not fit the schema."""

    exit_code = 2
