"""The one exception type users see: its message is a single line naming the file and the fix."""
import unicodedata


class SpotmatchError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""


def one_line(text: str) -> str:
    """`text` with its control characters written as escapes (\\n, \\x1b): a file or animal name holding a line
    break or a terminal escape would otherwise forge, or rewrite, the lines a user reads."""
    return "".join(character.encode("unicode_escape").decode("ascii") if unicodedata.category(character) == "Cc" else character
                   for character in text)
