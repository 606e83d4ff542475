"""The one exception type users see for bad input.

Every check on user input (paths, checkpoint contents, prompts, sampling values) raises
`TformerError` with a one-line message that names the problem and the fix; the CLI turns it into
`Error: ...` and exit code 2 instead of a traceback.
"""


class TformerError(ValueError):
    """Bad input: the message names the problem and how to fix it."""


class TformerNote(UserWarning):
    """Something tformer adapted on the way in (a stripped key prefix) that the user should know
    of; the CLI prints it as one `note:` line."""
