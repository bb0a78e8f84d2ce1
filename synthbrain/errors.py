"""Typed errors. The CLI and the app catch ``SynthBrainError`` and show its message; anything else
is a bug and is allowed to surface."""


class SynthBrainError(Exception):
    """Base class of every error the library raises on purpose (bad input, bad files, bad bundles)."""


class InvalidVolumeError(SynthBrainError, ValueError):
    """A NIfTI file (or an in-memory volume) that cannot be used; the message names the file."""


class ConditionError(SynthBrainError, ValueError):
    """A condition value or schema that is invalid (unknown name, out of range, wrong type)."""


class DatasetError(SynthBrainError):
    """A BIDS dataset that is incomplete or inconsistent; the message names the subject."""


class BundleError(SynthBrainError):
    """A model bundle that is missing, corrupt, truncated or does not match its config."""


class ConfigError(SynthBrainError, ValueError):
    """A configuration (training, model, sampling) with an invalid value."""


class OutputPathError(SynthBrainError, ValueError):
    """An output path that cannot be written (missing or read-only folder, a file where a folder goes)."""


class UnpreparedVolumeError(InvalidVolumeError):
    """A volume that is not a brain-extracted T1 in MNI152 space (the message says to run ``synthbrain prepare``)."""


class TrainingDiverged(SynthBrainError):
    """Training whose loss became NaN or infinite; the message names the step and the losses."""


class InsufficientMemoryError(SynthBrainError):
    """A job that needs more memory than the machine has free; refused before any of it is done."""
