"""Errors shared across the library."""


class CheckpointError(ValueError):
    """A model file that cannot be loaded: missing, corrupt, truncated or of the wrong layout."""


class BackboneWeightsUnavailable(RuntimeError):
    """Pretrained backbone weights that could not be obtained (for example on an offline machine)."""
