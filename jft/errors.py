"""Errors jft raises for bad input. Each message names the file and the key."""


class JftError(Exception):
  """Base class of every error jft raises on purpose."""


class CheckpointError(JftError, ValueError):
  """A checkpoint could not be read as the model it claims to be."""


class UnknownArchitectureError(CheckpointError):
  pass


class MissingTensorError(CheckpointError):
  pass


class UnexpectedTensorError(CheckpointError):
  pass


class ShapeMismatchError(CheckpointError):
  pass


class CorruptCheckpointError(CheckpointError):
  pass


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  pass


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's tree is not the one this run builds (another method, another model)."""
