"""The one exception every reader and writer raises, so callers catch a single type.

A `ScanError` is meant to be shown to a user as it is: its message names the file and the
problem, and for writers says that nothing was written.
"""


class ScanError(ValueError):
    """A scan that cannot be read or written as asked; the message names the file and why."""
