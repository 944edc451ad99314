"""Training failures that are reported to the user (component entry points exit 2 on them)."""

from cpcsam.errors import CpcSamError


class NonFiniteLossError(CpcSamError):
    """Training produced a NaN/inf loss, gradient or weight; the message names the step and the checkpoint."""
