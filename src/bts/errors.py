"""User-facing errors.

A `BTSError` is a mistake in what the user asked for (a bad path, mismatched members, an invalid recipe value).
Its message is one sentence naming the field and the offending value; the CLI prints it without a traceback and
exits non-zero. Anything else that escapes is a bug in bts and keeps its traceback.
"""


class BTSError(Exception):
    """A problem with the user's input, explained in one sentence."""
