"""Scaling out and publishing: launch configs (``accelerate_config``) and Hugging Face Hub export,
push and load (``hub``)."""
from visrep.launch.hub import (HubAuthError, HubError, HubUnavailableError, UnsafeWeightsError, export_for_hub, finish_run,
                               load_adaptation_from_hub, load_backbone_from_hub, load_clip_from_hub, push_run,
                               push_to_hub)

__all__ = ["HubAuthError", "HubError", "HubUnavailableError", "UnsafeWeightsError", "export_for_hub", "finish_run",
           "load_adaptation_from_hub", "load_backbone_from_hub", "load_clip_from_hub", "push_run", "push_to_hub"]
