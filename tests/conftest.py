"""Test-wide settings: no test reaches the network, and CPU runs stay small."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# arrays derived from packaged data (visrep.data.cache): one fresh cache per test session (and xdist
# worker), shared with the recipe subprocesses through the environment
if "VISREP_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["VISREP_CACHE"] = tempfile.mkdtemp(prefix="visrep-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VISREP_CACHE"], True)

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


CHEAP_MODULE_FIXTURES = {"tiny"}  # a preset file: made again on another worker at no cost
# Modules of long tests (minutes of 2-process DeepSpeed and recipe runs), longest first: handed out to
# the workers first, so that no single long test is left running alone at the end (longest processing
# time first; measured with --durations).
LONG_FIRST = ["test_deepspeed", "test_deepspeed_byol", "test_deepspeed_transfer", "test_clip_recipe",
              "test_distill_recipe", "test_byol_recipe", "test_adapt_recipe", "test_finetune_recipe",
              "test_precision", "test_launch", "test_clip_distributed", "test_distributed_ops"]


def pytest_collection_modifyitems(config, items):
    """For ``pytest -n 2 --dist loadgroup`` (``make test``): tests that share an expensive module-scoped
    fixture (a reference run) stay on one worker, so the run is made once; every other test goes
    wherever a worker is free."""
    import pytest

    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, fds in (defs.name2fixturedefs.items() if defs else ())
                        if name not in CHEAP_MODULE_FIXTURES and any(fd.scope == "module" for fd in fds))
        group = f"{item.module.__name__}::{shared[0]}" if shared else item.nodeid
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda it: rank.get(it.module.__name__, len(rank)))  # stable: the rest keep their order
