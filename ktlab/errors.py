"""Exceptions that the CLI and the server turn into one clear line (never a traceback)."""

from __future__ import annotations


class KtlabError(Exception):
    """Base of every error ktlab reports to a user as one line."""


class ModelFormatError(KtlabError, ValueError):
    """A model file is missing, truncated, corrupt, of an unsupported architecture or quant type.

    The message names the file and the field or tensor at fault.
    """
