"""Errors jft raises for bad input. Each message names the file and the key."""


class JftError(Exception):
  """Base class of every error jft raises on purpose."""


class RunFailure(JftError):
  """The work itself failed while it ran (a diverged loss, a save that hit a full disk), as
  opposed to bad input refused before it started: `jft` exits 1 for these, 2 for the rest."""


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
