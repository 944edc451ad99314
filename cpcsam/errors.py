"""Errors for bad user input. Each message names the file or value and the problem."""


class CpcSamError(Exception):
    """Base class: a problem with the user's input or configuration, not a bug."""


class ConfigError(CpcSamError):
    """`params.yaml` (or an override) is missing a key or holds a bad value."""


class DataError(CpcSamError):
    """A data source, manifest or annotation file cannot be used."""


class CheckpointError(CpcSamError):
    """A model checkpoint is missing, unreadable or does not match the model."""
