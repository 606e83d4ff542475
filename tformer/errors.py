"""The one exception type users see for bad input.

Every check on user input (paths, checkpoint contents, prompts, sampling values) raises
`TformerError` with a one-line message that names the problem and the fix; the CLI turns it into
`Error: ...` and exit code 2 instead of a traceback.
"""


import re


class TformerError(ValueError):
    """Bad input: the message names the problem and how to fix it."""


def one_line(exc: BaseException) -> str:
    """A short reason from a library's exception, to put inside a TformerError: its first line
    (libraries' messages span many), at most 160 characters. A bare code such as "(231)" or
    "[Errno 22]" says nothing, so then the exception's type stands in."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    text = text.splitlines()[0][:160] if text else ""
    return text if re.search(r"[A-Za-z]{4}", text) else type(exc).__name__


class TformerNote(UserWarning):
    """Something tformer adapted on the way in (a stripped key prefix) that the user should know
    of; the CLI prints it as one `note:` line."""
