"""What enhancement raises: one error type, with a subtype for inputs the model does not fit."""

from __future__ import annotations


class InferenceError(ValueError):
    """A workdir, input or output that enhancement cannot use; the message says which and why."""


class IncompatibleInput(InferenceError):
    """An input the model was not trained for (units, channels); nothing was computed."""
