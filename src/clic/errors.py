"""Typed errors. Library code raises these; only the CLI turns them into one-line messages and exit code 2."""


class ClicError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class InputError(ClicError):
    """A bad input file, mask, prompt or option."""


class ModelError(ClicError):
    """A model that cannot be found or loaded, or that does not fit the concept."""


class ConceptFileError(ClicError):
    """A concept file that is missing, corrupt, or made for another base model."""


class TrainingError(ClicError):
    """Training diverged (NaN/inf loss) or could not resume."""


class OutputError(ClicError):
    """An output that cannot be written (a full disk, a read-only place); nothing half-written is left."""


class NonFiniteError(ClicError):
    """A computation produced NaN or inf; it was stopped before the value reached an output."""
