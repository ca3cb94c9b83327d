"""The exceptions of adapter files: one base class, a subclass per kind of refusal.

Every reader and writer of adapter files and PEFT folders raises
:class:`AdapterFileError` or one of its subclasses, never a library's own error type
(``KeyError``, ``json.JSONDecodeError``, ``SafetensorError``, ...). It subclasses
``ValueError``, so code catching ``ValueError`` keeps working.
"""

from __future__ import annotations


class AdapterFileError(ValueError):
    """An adapter file or folder is malformed or does not fit what it is loaded into."""


class NotAnAdapterError(AdapterFileError):
    """The path is missing, not a regular file (or folder), or not in either adapter format at all."""


class AdapterTooLargeError(AdapterFileError):
    """Loading would allocate more than the byte budget (see :func:`vera_core.loading.byte_budget`)."""


class UnknownGeneratorError(AdapterFileError):
    """The projections must be regenerated with a generator or version this vera-core does not know."""


class ProjectionMismatchError(AdapterFileError):
    """The projections (stored or regenerated) do not match the recorded ``projections_sha256``."""


class PayloadMismatchError(AdapterFileError):
    """The tensors do not match the ``payload_sha256`` recorded when the file was written."""
