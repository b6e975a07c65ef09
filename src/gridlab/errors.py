"""The line between a user's mistake and a bug.

``UserError`` is something the user can fix (a bad grid value, a missing run folder, an unknown metric): the CLI
prints its one line as "gridlab: …" and exits 2. Anything else is a bug and keeps its traceback (exit 1);
``GRIDLAB_DEBUG=1`` or ``gridlab --debug`` shows the traceback of user errors too.

It subclasses ValueError so library callers that catch ValueError for bad arguments keep working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class UserError(ValueError):
    """A mistake in what the user gave gridlab; its message is one line: what was wrong, what is valid."""


class InvalidValue(ValueError):
    """A bad value at ``key``, a key path below whatever validates it (``options.axes`` inside a method): the grid
    loader joins it to the validator's own path, so the user reads ``methods[0].options.axes: …``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@contextlib.contextmanager
def in_grid_file(path: str | Path) -> Iterator[None]:
    """Name the grid file in every UserError about its content, in the one format every such error has:
    ``<grid file as given>: <key path>: <what was wrong, what is valid>``."""
    try:
        yield
    except UserError as error:
        prefix = f"{path}: "
        if str(error).startswith(prefix):
            raise
        raise UserError(prefix + str(error)) from None
