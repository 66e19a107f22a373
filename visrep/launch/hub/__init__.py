"""Publishing a finished run on the Hugging Face Hub, and loading it back.

A pushed model repo holds three files, written in one commit (four kinds with an ``hf:`` model):

* ``model.safetensors`` -- the exported weights (the zoo's key names; timm's for timm backbones);
* ``config.json`` -- what rebuilds the model. visrep's description (zoo name, number of classes,
  ``small_input``, builder kwargs, data config, the run's training config, recipe, stage, results)
  lives under ``"visrep"``. For a timm architecture the top level is timm's own hub config
  (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg`` with mean/std/input size),
  so ``timm.create_model("hf-hub:USER/REPO", pretrained=True)`` reads the same file; otherwise the
  top level repeats the export's keys (``visrep.engine.export`` format);
* ``README.md`` -- a model card: YAML front matter, the metrics table from ``results.json``, the
  dataset, the command that reproduces the run and the code that loads the model.
* ``hf/KEY/`` -- for a transformers model (an ``hf:`` architecture, an ``hf`` CLIP text tower), the
  transformers config, image-processor settings and tokenizer its export carries (``hf_files`` in
  ``config.json``), so it loads back from the Hub without the original repo or folder.

::

    export_for_hub("runs/distill", "hub/distill")               # the folder, nothing sent
    push_to_hub("runs/distill", "me/resnet20-digits-kd")        # one commit
    model = load_backbone_from_hub("me/resnet20-digits-kd")     # or a local folder

Loading reads ``config.json``, ``model.safetensors`` and ``hf/`` only: nothing downloaded is ever unpickled,
and the weights must match the architecture key for key.

The token comes from ``token=``, ``HF_TOKEN`` or the Hugging Face login (``hf auth login``); it is
handed to ``huggingface_hub`` and to nothing else -- it is never written, logged or put in an error.
"""
from visrep.launch.hub.card import export_for_hub
from visrep.launch.hub.load import (create_from_hub, load_adaptation_from_hub, load_backbone_from_hub,
                                    load_clip_from_hub)
from visrep.launch.hub.publish import finish_run, push_run, push_to_hub
from visrep.launch.hub.transport import (CARD_NAME, CONFIG_NAME, HUB_FILES, HUB_PREFIX, WEIGHTS_NAME, HubAuthError,
                                         HubError, HubUnavailableError, UnsafeWeightsError, resolve_token)

__all__ = ["export_for_hub", "create_from_hub", "load_adaptation_from_hub", "load_backbone_from_hub",
           "load_clip_from_hub", "finish_run", "push_run", "push_to_hub", "CARD_NAME", "CONFIG_NAME", "HUB_FILES",
           "HUB_PREFIX", "WEIGHTS_NAME", "HubAuthError", "HubError", "HubUnavailableError", "UnsafeWeightsError",
           "resolve_token"]
