"""Errors that the CLI turns into one clear line and an exit code."""


class SuperviseError(Exception):
    """A failure the user can act on; `str(err)` says what is wrong and what to do."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """An error's first line, or its type's name when it says nothing."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
