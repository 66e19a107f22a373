"""Run under ``accelerate launch`` (e.g. DeepSpeed ZeRO-2 bf16, one process): several recipes one after
the other in this one process -- one interpreter start-up and one import of torch and DeepSpeed for all
of them. Arguments: an output JSON, then RECIPE=PRESET pairs; each recipe writes to the preset's folder
/ RECIPE. The JSON maps each recipe to its exit status."""
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from ds_helpers import load_recipe
from helpers import exit_cleanly, reset_accelerate
from visrep.errors import run_cli


def end_trackers_only(self) -> None:
    """``Accelerator.end_training`` without destroying the process group, which the next recipe (and
    DeepSpeed's record of the group) goes on using; it is destroyed once, at the end."""
    for tracker in self.trackers:
        tracker.finish()


Accelerator.end_training = end_trackers_only
status = {}
for pair in sys.argv[2:]:
    recipe, preset = pair.split("=", 1)
    out = Path(preset).parent / recipe
    status[recipe] = run_cli(load_recipe(recipe).main, ["--config", preset, "--output-dir", str(out)])
    reset_accelerate()
Path(sys.argv[1]).write_text(json.dumps(status))
exit_cleanly()  # no interpreter teardown with a process group alive
