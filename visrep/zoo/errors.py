"""Errors raised by the zoo."""


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be reached (offline, none published, ...).

    The zoo never falls back to a random init: pass a local file with
    ``create_backbone(name, checkpoint="weights.safetensors")`` instead.
    """

    user_error = True  # reported without a traceback (visrep.errors; the zoo imports nothing of ours)


class CheckpointMismatchError(RuntimeError):
    """A ``checkpoint=`` file does not match the model's state dict key for key."""

    user_error = True


class UnknownNameError(KeyError):
    """A name (of a backbone, a layer, ...) that is not there; the message lists close matches."""

    user_error = True

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownBackboneError(UnknownNameError):
    """A backbone name that is not registered; the message lists close matches."""


class BackboneArgumentError(ValueError):
    """A backbone was asked for with arguments it cannot take (a transformers model with small_input, an
    unknown config key, an unsupported model type, ...); the message says what to do instead."""

    user_error = True
