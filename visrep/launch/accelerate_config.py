"""``visrep launch``: one recipe, unchanged, on 1 GPU, N GPUs, DeepSpeed ZeRO, or a multi-node SLURM job.

It writes into ``RUN_DIR/launch/``:

- ``accelerate_config.yaml``  -- the Accelerate config (``accelerate launch --config_file``),
- ``deepspeed.json``          -- with ``--deepspeed zero1|zero2|zero3`` (batch sizes, accumulation,
                                 clipping and precision left ``auto``: the recipe's config decides),
- ``command.sh``              -- the exact command, also printed,
- ``job.sbatch``              -- with ``--slurm``: one task per node, each running ``accelerate launch``.

SLURM pitfalls this script handles (and users hit by hand):

1. ``--num_processes`` is the TOTAL over all nodes (nodes x GPUs per node), not per node.
2. Every node must be told the head node's address; it is taken from the job's node list
   (``scontrol show hostnames $SLURM_JOB_NODELIST | head -n1``), never ``localhost``.
3. Per-node values (``$SLURM_NODEID`` for ``--machine_rank``) must be expanded on each node, by the
   shell that ``srun`` starts there -- not once by the batch script. The command is therefore passed
   to ``srun bash -c '...'`` in single quotes, with ``$SLURM_NODEID`` inside them.
4. One task per node (``--ntasks-per-node=1``): Accelerate starts the GPU processes itself; letting
   SLURM start one task per GPU as well would start G x G processes.
5. Rank 0 -- the process that writes every file -- must be on the head node: the static rendezvous
   (``--rdzv_backend static``) gives node ``$SLURM_NODEID`` the ranks from ``$SLURM_NODEID x GPUs``
   (with ``c10d`` the ranks go to whichever node joins first and ``--machine_rank`` is ignored).
6. The time limit: SLURM is asked (``--signal=B:USR1@N``) to warn the batch script N seconds before it;
   the script then sends SIGTERM to the job's processes (``scancel --signal=TERM``), every rank finishes
   its step and writes a checkpoint, and the script requeues the job (``scontrol requeue``, with
   ``--requeue`` and ``--open-mode=append``). The requeued job finds ``state.json`` in the run
   directory and continues with ``--resume latest``. ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` gives the ranks
   those N seconds before torchrun would kill them, and the launcher itself ignores SIGTERM (its
   ranks handle it), so it waits for them instead of dying first.
7. One task per node runs all its GPU processes and their loader workers, but SLURM gives a task one
   CPU unless told otherwise: ``--cpus-per-task`` = ``--cpus-per-gpu`` x GPUs per node.
8. The environment: the script puts this Python environment's ``bin`` first on ``PATH``; ``srun``
   hands the batch script's environment to every node, so each finds the same ``accelerate``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import yaml

from visrep.engine.distributed import deepspeed_config_template
from visrep.errors import EXIT_REQUEUE

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclasses.dataclass
class LaunchSpec:
    recipe: str
    recipe_args: list[str] = dataclasses.field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 1
    """Processes per node (GPUs; with --cpu, CPU processes)."""
    deepspeed: Optional[Literal["zero1", "zero2", "zero3"]] = None
    offload: Optional[Literal["optimizer", "params"]] = None
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    main_process_port: int = 29500
    cpu: bool = False
    slurm: bool = False
    job_name: Optional[str] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    cpus_per_gpu: int = 8
    """SLURM: CPU cores per GPU (the processes and their data-loader workers); --cpus-per-task is this x GPUs."""
    requeue_before: int = 180
    """SLURM: seconds before the time limit at which the job checkpoints and requeues itself (0: never)."""
    dry_run: bool = False

    @property
    def num_processes(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes ({self.nodes}) and --gpus-per-node ({self.gpus_per_node}) must be >= 1.")
        if self.offload and not self.deepspeed:
            raise ValueError("--offload needs --deepspeed (ZeRO offloading).")
        if self.offload == "params" and self.deepspeed != "zero3":
            raise ValueError("--offload params needs --deepspeed zero3: only ZeRO-3 partitions parameters.")
        if self.cpu and self.slurm:
            raise ValueError("--slurm is for GPU clusters; drop --cpu.")
        if self.cpus_per_gpu < 1:
            raise ValueError(f"--cpus-per-gpu ({self.cpus_per_gpu}) must be >= 1.")
        if self.requeue_before < 0:
            raise ValueError(f"--requeue-before ({self.requeue_before}) must be >= 0 seconds (0: no requeue).")


def recipe_path(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix == ".py" and p.is_file():
        return p
    candidate = RECIPES_DIR / f"{recipe}.py"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.py"))
    raise FileNotFoundError(f"unknown recipe '{recipe}'. Known recipes: {', '.join(known)} (or a path to a .py file).")


def output_dir_of(spec: LaunchSpec) -> tuple[Path, list[str]]:
    """The run dir the recipe will use, and the recipe args with ``--output-dir`` made explicit."""
    args = list(spec.recipe_args)
    for i, a in enumerate(args):
        if a in ("--output-dir", "--output_dir") and i + 1 < len(args):
            return Path(args[i + 1]), args
        if a.startswith(("--output-dir=", "--output_dir=")):
            return Path(a.split("=", 1)[1]), args
    out = Path("runs") / Path(spec.recipe).stem
    return out, args + ["--output-dir", str(out)]


def deepspeed_json(spec: LaunchSpec) -> dict:
    return deepspeed_config_template(int(spec.deepspeed[-1]), spec.offload, pin_memory=not spec.cpu)


def accelerate_config(spec: LaunchSpec, deepspeed_file: Optional[Path]) -> dict:
    if spec.deepspeed:
        dtype = "DEEPSPEED"
    elif spec.num_processes == 1:
        dtype = "NO"
    else:
        dtype = "MULTI_GPU"  # on --cpu, ACCELERATE_USE_CPU=1 turns it into gloo processes
    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": dtype,
        "num_machines": spec.nodes,
        "num_processes": spec.num_processes,
        "machine_rank": 0,
        "main_process_port": spec.main_process_port,
        "mixed_precision": spec.mixed_precision or "no",
        "use_cpu": spec.cpu,
        "dynamo_config": {},
        "debug": False,
    }
    if not spec.cpu:
        cfg["gpu_ids"] = "all"
    if spec.nodes > 1:
        cfg["main_process_ip"] = "127.0.0.1"  # placeholder: each node passes the head's address
    if deepspeed_file is not None:
        cfg.pop("mixed_precision")  # with a DeepSpeed config file, precision comes from the recipe ("auto")
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file.resolve()),
                                   "deepspeed_multinode_launcher": "standard",
                                   "zero3_init_flag": spec.deepspeed == "zero3"}
    return cfg


def write_launch_files(spec: LaunchSpec) -> dict:
    """Write the configs (and sbatch script) into RUN_DIR/launch; return their paths and the command."""
    spec.validate()
    script = recipe_path(spec.recipe)
    run_dir, recipe_args = output_dir_of(spec)
    if spec.mixed_precision:
        recipe_args = recipe_args + ["--run.mixed-precision", spec.mixed_precision]
    launch_dir = run_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    json_path = None
    if spec.deepspeed:
        json_path = launch_dir / "deepspeed.json"
        json_path.write_text(json.dumps(deepspeed_json(spec), indent=2) + "\n")
        files["deepspeed"] = json_path
    acc_file = launch_dir / "accelerate_config.yaml"
    acc_file.write_text(yaml.safe_dump(accelerate_config(spec, json_path), sort_keys=False))
    files["accelerate_config"] = acc_file
    cmd = command(spec, acc_file, script, recipe_args)
    files["command"] = cmd
    (launch_dir / "command.sh").write_text("#!/usr/bin/env bash\n" + cmd + "\n")
    if spec.slurm:
        sb = launch_dir / "job.sbatch"
        sb.write_text(slurm_script(spec, acc_file, script, recipe_args, run_dir))
        files["sbatch"] = sb
    return files


def _env_prefix(spec: LaunchSpec) -> str:
    # DeepSpeed on a CPU host must NOT get ACCELERATE_USE_CPU (it would switch DeepSpeed off);
    # plain multi-process CPU runs need it to start gloo processes.
    return "ACCELERATE_USE_CPU=1 " if spec.cpu and not spec.deepspeed and spec.num_processes > 1 else ""


def command(spec: LaunchSpec, acc_file: Path, script: Path, recipe_args: list[str]) -> str:
    parts = ["accelerate", "launch", "--config_file", str(acc_file)]
    if spec.nodes > 1:
        parts += ["--machine_rank", "$MACHINE_RANK", "--main_process_ip", "$MAIN_PROCESS_IP"]
    parts += [str(script), *recipe_args]
    quoted = " ".join(p if p.startswith("$") else shlex.quote(p) for p in parts)
    return _env_prefix(spec) + quoted


def slurm_script(spec: LaunchSpec, acc_file: Path, script: Path, recipe_args: list[str], run_dir: Path) -> str:
    name = spec.job_name or f"visrep-{Path(spec.recipe).stem}"
    launch = " ".join(shlex.quote(p) for p in [
        "accelerate", "launch", "--config_file", str(acc_file),
        "--num_machines", str(spec.nodes), "--num_processes", str(spec.num_processes)])
    per_node = ("--machine_rank $SLURM_NODEID --main_process_ip $HEAD_NODE_IP "
                f"--main_process_port {spec.main_process_port} --rdzv_backend static")
    recipe = " ".join(shlex.quote(p) for p in [str(script), *recipe_args])
    grace = spec.requeue_before
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_gpu * spec.gpus_per_node}",
        f"#SBATCH --output={run_dir}/launch/slurm-%j.out",
    ]
    if grace:
        lines += [f"#SBATCH --signal=B:USR1@{grace}", "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.time:
        lines.append(f"#SBATCH --time={spec.time}")
    state = shlex.quote(str(run_dir / "state.json"))
    inner = f"{launch} {per_node} {recipe} $RESUME_ARGS"
    if grace:
        # the launcher ignores SIGTERM and waits for its ranks, which handle it (checkpoint, exit 75)
        inner = f"trap \"\" TERM; {inner}"
    lines += [
        "set -uo pipefail",
        "# this Python environment on every node (srun passes the environment on)",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
        "# total processes = nodes x GPUs per node; one srun task per node starts them",
        "export HEAD_NODE_IP=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        "# a requeued job (or a resubmitted one) continues the run it finds",
        f"RESUME_ARGS=\"\"; if [ -e {state} ]; then RESUME_ARGS=\"--resume latest\"; fi",
        "export RESUME_ARGS",
    ]
    if grace:
        lines += [
            f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}  # torchrun waits this long for ranks to checkpoint",
            "REQUEUE=0",
            "on_time_limit() {",
            f"  echo \"[visrep] $(date): {grace} s to the time limit: every rank checkpoints after its step\" >&2",
            "  REQUEUE=1",
            "  scancel --signal=TERM \"$SLURM_JOB_ID\"  # the job's steps, not this script",
            "}",
            "trap on_time_limit USR1",
        ]
    lines += [
        "# single quotes: $SLURM_NODEID is expanded by the shell srun starts on each node",
        f"srun --kill-on-bad-exit=1 bash -c '{inner}' &",
        "SRUN_PID=$!",
        "STATUS=0",
        "while :; do  # a trapped signal interrupts wait; wait again until srun has ended",
        "  wait \"$SRUN_PID\"; STATUS=$?",
        "  kill -0 \"$SRUN_PID\" 2>/dev/null || break",
        "done",
    ]
    if grace:
        lines += [
            f"if [ \"$REQUEUE\" = 1 ] || [ \"$STATUS\" = {EXIT_REQUEUE} ]; then",
            "  echo \"[visrep] requeueing job $SLURM_JOB_ID; it continues with --resume latest\" >&2",
            "  scontrol requeue \"$SLURM_JOB_ID\"",
            "  exit 0",
            "fi",
        ]
    lines += ["exit \"$STATUS\"", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> LaunchSpec:
    p = argparse.ArgumentParser(prog="visrep launch", description=__doc__.split("\n\n")[0],
                                epilog="Everything after the recipe that is not a launcher option goes to the recipe.")
    p.add_argument("recipe", help="distill | byol | clip | finetune | adapt, or a path to a recipe .py")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--deepspeed", choices=["zero1", "zero2", "zero3"], default=None)
    p.add_argument("--offload", choices=["optimizer", "params"], default=None)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--main-process-port", type=int, default=29500)
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo) instead of GPUs")
    p.add_argument("--slurm", action="store_true", help="write an sbatch script (and submit it unless --dry-run)")
    p.add_argument("--job-name", default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None)
    p.add_argument("--cpus-per-gpu", type=int, default=8,
                   help="SLURM: CPU cores per GPU for its process and loader workers (default 8)")
    p.add_argument("--requeue-before", type=int, default=180, metavar="SECONDS",
                   help="SLURM: checkpoint and requeue this long before the time limit (0: never; default 180)")
    p.add_argument("--dry-run", action="store_true", help="write and print, run nothing")
    known, rest = p.parse_known_args(argv)
    spec = LaunchSpec(recipe=known.recipe, recipe_args=rest, nodes=known.nodes, gpus_per_node=known.gpus_per_node,
                      deepspeed=known.deepspeed, offload=known.offload, mixed_precision=known.mixed_precision,
                      main_process_port=known.main_process_port, cpu=known.cpu, slurm=known.slurm,
                      job_name=known.job_name, partition=known.partition, time=known.time,
                      cpus_per_gpu=known.cpus_per_gpu, requeue_before=known.requeue_before, dry_run=known.dry_run)
    return spec


def main(argv: Optional[list[str]] = None) -> int:
    spec = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        files = write_launch_files(spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"visrep launch: {e}", file=sys.stderr)
        return 2
    for key in ("accelerate_config", "deepspeed", "sbatch"):
        if key in files:
            print(f"# wrote {files[key]}")
    if spec.slurm:
        print(files["sbatch"].read_text())
        if spec.dry_run:
            return 0
        return subprocess.call(["sbatch", str(files["sbatch"])])
    print(files["command"])
    if spec.dry_run:
        return 0
    if spec.nodes > 1:
        print("visrep launch: multi-node without --slurm: run the command above on every node with "
              "MACHINE_RANK and MAIN_PROCESS_IP set.", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's accelerate
    if _env_prefix(spec):
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.call(["bash", "-c", files["command"].removeprefix(_env_prefix(spec))], env=env)


if __name__ == "__main__":
    sys.exit(main())
