"""The line between a user's mistake and a bug.

``UserError`` is something the user can fix (a bad grid value, a missing run folder, an unknown metric): the CLI
prints its one line as "gridlab: …" and exits 2. Anything else is a bug and keeps its traceback (exit 1);
``GRIDLAB_DEBUG=1`` or ``gridlab --debug`` shows the traceback of user errors too.

It subclasses ValueError so library callers that catch ValueError for bad arguments keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave gridlab; its message is one line: what was wrong, what is valid."""
