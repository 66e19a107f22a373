"""Errors raised by the zoo."""


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be reached (offline, none published, ...).

    The zoo never falls back to a random init: pass a local file with
    ``create_backbone(name, checkpoint="weights.safetensors")`` instead.
    """


class CheckpointMismatchError(RuntimeError):
    """A ``checkpoint=`` file does not match the model's state dict key for key."""
