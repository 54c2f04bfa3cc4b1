"""The one exception type a user is meant to see."""


class UserError(Exception):
    """A mistake the user can fix: bad data, a bad YAML file, a bad flag.

    The CLI prints the message on one line and exits with code 2; no traceback.
    The message names the file or key at fault and says what to do about it.
    """
