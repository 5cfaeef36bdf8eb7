"""The one exception type for mistakes a user can fix (bad file, row, column, key, flag)."""


class UserError(Exception):
    """Bad input. The CLI prints the message on one line and exits with code 2 (no traceback).

    The message must say what is wrong and where (file, row, column or key), and what to do.
    """
