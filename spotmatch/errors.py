"""The one exception type users see: its message is a single line naming the file and the fix."""


class SpotmatchError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""
