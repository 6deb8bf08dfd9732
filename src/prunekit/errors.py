"""The one base class of the errors that are the user's to fix.

Every such error names the problem and the fix in one sentence, and is raised before expensive
work where it can be. The command line catches `PrunekitError` once and prints that sentence
(exit code 2, no traceback); anything else that escapes is a bug and keeps its traceback.
Each subclass also keeps the builtin base it had (ValueError, FileExistsError, OSError), so
callers that caught those still do.
"""
from __future__ import annotations


class PrunekitError(Exception):
    """A problem with the user's input, settings, files or machine, explained in one sentence."""


__all__ = ["PrunekitError"]
