"""The project's failures that a person can fix from the message alone.

A bad input file, a missing or damaged model folder, a run whose weights diverged: none of these is a bug, and a
traceback only hides the one line that matters. Each raises an :class:`ActionableError` (or a subclass) whose message
says what is wrong and what to do; the CLI prints that line alone and exits with status 2. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


class ActionableError(Exception):
    """A failure of an input, a setting or a run, not of the code: the message names the file (and line and field,
    where there are such) and says what to do."""
