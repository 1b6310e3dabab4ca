"""The line between a user's mistake and a bug.

A `UserError` (bad data, bad config, a missing or corrupt file) is reported by the entry points as
one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
  """Something the user can fix: the message names the file, record, field or setting."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work; the message names the field (e.g. `train.steps`)."""


class DataError(UserError, ValueError):
  """A data file that cannot be used as a whole (empty, truncated, wrong checksum)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient norm; nothing non-finite was checkpointed."""


class CheckpointError(UserError):
  """No checkpoint in a run directory restores cleanly."""


class StorageError(UserError, OSError):
  """A run directory on object storage cannot be read or written (missing bucket, refused
  credentials, a server that stopped answering); the message names the URL."""
