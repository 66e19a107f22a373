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

# One intra-op thread per xdist worker when the workers share the cores (`make test`: -n 2 on 2 cores). With
# two threads each, the workers and the 2-process launches oversubscribe the cores and OpenMP's spinning
# threads slow every test: a check that takes 11 s next to a busy launch took 28 s with 2 threads. The
# recipe subprocesses (in-process runs, `python -m`, accelerate launch) inherit the same setting.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    # torch.compile's inductor compiles in this process instead of starting a pool of compile workers (each
    # importing torch) on cores that are already busy: test_fast.py took 88 s of CPU instead of 116 s
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import ds_without_shm  # noqa: E402

ds_without_shm.install()  # DeepSpeed without its JIT-built CPU inference kernel, as in the test subprocesses

torch.set_num_threads(_THREADS)


CHEAP_MODULE_FIXTURES = {"tiny", "uneven", "packed", "hf_parquet"}  # presets, small shards: made again on another worker


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the mark into the group
def pytest_collection_modifyitems(config, items):
    """For ``pytest -n 2 --dist loadgroup`` (``make test``): tests that share an expensive module-scoped
    fixture (a reference run) stay on one worker, so the run is made once; every other test goes
    wherever a worker is free. Groups holding an end-to-end run (marked ``slow``) are handed out first and
    the many short tests last (each part in collection order; the Makefile turns xdist's own reordering off),
    so the two workers finish together instead of one waiting on a long run that started late."""
    groups = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, fds in (defs.name2fixturedefs.items() if defs else ())
                        if name not in CHEAP_MODULE_FIXTURES and any(fd.scope == "module" for fd in fds))
        group = f"{item.module.__name__}::{shared[0]}" if shared else item.nodeid
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item] = group
    slow_groups = {groups[item] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: groups[item] not in slow_groups)  # stable: collection order within each part


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """The module's ``TINY`` preset written as YAML (a recipe's ``--config``)."""
    from helpers import write_preset

    name = request.module.__name__.rsplit(".", 1)[-1]
    return write_preset(tmp_path_factory.mktemp("presets") / f"{name}.yaml", request.module.TINY)


@pytest.fixture
def fresh_accelerate_state():
    """Each test of a module that builds ``Accelerator`` objects in-process starts from no state."""
    from helpers import reset_accelerate

    yield
    reset_accelerate()
