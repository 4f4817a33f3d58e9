"""The base of every error a user can cause and fix: the CLI prints its message without a traceback."""


class UserError(ValueError):
    """Bad input, a bad config, or an unsupported request; the message says what was wrong and what to do."""
