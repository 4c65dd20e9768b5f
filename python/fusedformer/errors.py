"""``UserError``: a mistake in what the user gave (a path, a value, a model name), as opposed to a bug.
The command line prints it as one ``error: ...`` line and exits with status 2; library callers can
catch it as the ``ValueError`` it is."""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and what was expected."""
