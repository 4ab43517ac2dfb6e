"""Errors of the engine: model files that cannot be loaded."""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file is missing, truncated, or not a checkpoint this engine can load."""


class ModelFileMissing(ModelFileError, FileNotFoundError):
    """The model file (or a file a checkpoint directory needs) does not exist."""


class ModelFileTruncated(ModelFileError):
    """The model file ends before the data its header promises."""


class UnsupportedModel(ModelFileError):
    """The file is readable but holds an architecture, tensor type or tokenizer this engine does not implement."""
