"""The one exception a user can cause. The CLI turns it into one line and exit code 2."""


class RetinoError(Exception):
    """An error caused by the user's input (paths, options, files), not by a bug."""
