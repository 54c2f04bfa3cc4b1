"""The one exception type a user is meant to see."""


class UserError(Exception):
    """A mistake the user can fix: bad data, a bad YAML file, a bad flag.

    The CLI prints the message on one line and exits with code 2; no traceback.
    The message names the file or key at fault and says what to do about it.
    """


class Stopped(Exception):
    """A sweep stopped by a signal (Ctrl-C, SIGTERM) after saving what it had.

    The CLI prints the message, which says how to go on, and exits with 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM), as shells do.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Stalled(Exception):
    """A sweep that had nothing to run for longer than its stall limit, ended after
    saving what it had: the CLI prints the message, which says why and how to go on,
    and exits with code 1."""
