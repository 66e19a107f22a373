"""Run by Python at the start-up of every process the tests start (``tests/`` is first on their PYTHONPATH,
``helpers._base_env``), so it hides any system ``sitecustomize`` from them (this machine's Python and the venv
have none): DeepSpeed without its JIT-built CPU inference kernel (``tests/ds_without_shm.py``)."""
import ds_without_shm

ds_without_shm.install()
