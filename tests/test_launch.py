"""visrep launch: Accelerate / DeepSpeed configs, SLURM scripts, and a real 2-node job on one machine."""
import json
import os
import subprocess

import pytest
import yaml

from helpers import free_port, ROOT, VENV_BIN, env, write_preset
from visrep.launch.accelerate_config import LaunchSpec, deepspeed_json, main, write_launch_files


def test_slurm_dry_run_one_and_four_nodes(tmp_path, capsys):
    for nodes in (1, 4):
        out = tmp_path / f"n{nodes}"
        assert main(["distill", "--nodes", str(nodes), "--gpus-per-node", "8", "--deepspeed", "zero2", "--slurm",
                     "--dry-run", "--output-dir", str(out), "--kd.temperature", "2"]) == 0
        script = (out / "launch" / "job.sbatch").read_text()
        printed = capsys.readouterr().out
        assert printed.endswith(script + "\n") and f"# wrote {out}/launch/deepspeed.json" in printed
        lines = script.splitlines()
        assert lines[0] == "#!/bin/bash"
        assert f"#SBATCH --nodes={nodes}" in lines and "#SBATCH --ntasks-per-node=1" in lines
        assert "#SBATCH --gpus-per-node=8" in lines
        assert 'export HEAD_NODE_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
        srun = [l for l in lines if l.startswith("srun ")]
        assert len(srun) == 1 and srun[0].startswith("srun --kill-on-bad-exit=1 bash -c '")
        assert srun[0].endswith("' &") and srun[0].count("'") == 2, "per-node variables stay inside single quotes"
        # the time limit: warned 180 s ahead, the launcher waits for its ranks, the job requeues and resumes
        assert "#SBATCH --signal=B:USR1@180" in lines and "#SBATCH --requeue" in lines
        assert "#SBATCH --open-mode=append" in lines
        assert srun[0].startswith("srun --kill-on-bad-exit=1 bash -c 'trap \"\" TERM; accelerate launch")
        assert srun[0].endswith(" $RESUME_ARGS' &")
        assert f'RESUME_ARGS=""; if [ -e {out}/state.json ]; then RESUME_ARGS="--resume latest"; fi' in lines
        assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=180  # torchrun waits this long for ranks to checkpoint" in lines
        assert "trap on_time_limit USR1" in lines and '  scancel --signal=TERM "$SLURM_JOB_ID"' in script
        assert 'if [ "$REQUEUE" = 1 ] || [ "$STATUS" = 75 ]; then' in lines
        assert '  scontrol requeue "$SLURM_JOB_ID"' in lines
        assert subprocess.run(["bash", "-n", str(out / "launch" / "job.sbatch")]).returncode == 0
        body = srun[0]
        assert f"--num_machines {nodes} --num_processes {8 * nodes} " in body, "num_processes is the TOTAL"
        assert "--machine_rank $SLURM_NODEID --main_process_ip $HEAD_NODE_IP" in body
        assert "--rdzv_backend static" in body, "rank 0 on the head node (c10d ignores --machine_rank)"
        assert "#SBATCH --cpus-per-task=64" in lines, "8 GPUs x 8 cores: not SLURM's 1 CPU per task"
        assert f"export PATH={VENV_BIN}:$PATH" in lines, "the same environment on every node"
        assert f"--config_file {out}/launch/accelerate_config.yaml" in body
        assert body.index("--rdzv_backend") < body.index("recipes/distill.py") < body.index("--kd.temperature 2")
        acc = yaml.safe_load((out / "launch" / "accelerate_config.yaml").read_text())
        assert acc["distributed_type"] == "DEEPSPEED" and acc["num_machines"] == nodes
        assert acc["num_processes"] == 8 * nodes and "mixed_precision" not in acc
        assert "rdzv_backend" not in acc and "same_network" not in acc, "only keys that take effect"
        ds = json.loads((out / "launch" / "deepspeed.json").read_text())
        assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == "auto"


def test_slurm_without_requeue(tmp_path):
    files = write_launch_files(LaunchSpec("distill", ["--output-dir", str(tmp_path)], slurm=True, requeue_before=0))
    script = files["sbatch"].read_text()
    assert "--signal" not in script and "scontrol requeue" not in script and "--requeue" not in script
    assert "trap on_time_limit" not in script and 'trap "" TERM' not in script
    assert "$RESUME_ARGS' &" in script
    with pytest.raises(ValueError, match="--requeue-before"):
        write_launch_files(LaunchSpec("distill", ["--output-dir", str(tmp_path)], slurm=True, requeue_before=-1))


def test_deepspeed_json_and_option_checks(tmp_path):
    ds = deepspeed_json(LaunchSpec("distill", deepspeed="zero3", offload="params"))
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert z["reduce_bucket_size"] == z["stage3_prefetch_bucket_size"] == "auto"  # sized from the model at prepare
    assert z["stage3_param_persistence_threshold"] == 100_000
    from visrep.engine.distributed import size_buckets

    assert size_buckets({"stage": 2}, 272_474) == {"stage": 2, "reduce_bucket_size": 2 ** 20,
                                                    "allgather_bucket_size": 2 ** 20}  # a ResNet-20: 1M, not 5e8
    assert size_buckets({"stage": 2, "reduce_bucket_size": "auto"}, 25_000_000)["reduce_bucket_size"] == 24 * 2 ** 20  # 25e6 rounded up to 2^20s
    assert size_buckets({"stage": 3, "reduce_bucket_size": 7}, 7_000_000_000) == {
        "stage": 3, "reduce_bucket_size": 7, "stage3_prefetch_bucket_size": 50_000_000}  # explicit sizes kept
    assert size_buckets({"stage": 1}, 7_000_000_000)["allgather_bucket_size"] == 500_000_000
    with pytest.raises(ValueError, match="needs --deepspeed zero3"):
        write_launch_files(LaunchSpec("distill", ["--output-dir", str(tmp_path)], deepspeed="zero2", offload="params"))
    with pytest.raises(FileNotFoundError, match="Known recipes: .*distill"):
        write_launch_files(LaunchSpec("nope", ["--output-dir", str(tmp_path)]))
    files = write_launch_files(LaunchSpec("distill", ["--seed", "3", "--output-dir", str(tmp_path / "r")],
                                          cpu=True, gpus_per_node=2))
    assert files["command"].startswith(f"ACCELERATE_USE_CPU=1 accelerate launch --config_file {tmp_path}/r/launch/")
    assert files["command"].endswith(f"--seed 3 --output-dir {tmp_path}/r")
    assert (tmp_path / "r" / "launch" / "command.sh").read_text().splitlines()[1] == files["command"]


@pytest.mark.slow
def test_two_nodes_on_one_machine_write_one_checkpoint(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", {
        "data": {"image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
        "teacher": {"model": {"name": "resnet20", "kwargs": {"width": 0.25}}, "train_epochs": 1},
        "student": {"name": "resnet20", "kwargs": {"width": 0.25}}, "kd": {"allow_weaker_teacher": True},
        "schedule": {"epochs": 1}, "run": {"batch_size": 32, "progress": False}})
    out = tmp_path / "run"
    files = write_launch_files(LaunchSpec("distill", ["--config", str(preset), "--output-dir", str(out)], nodes=2,
                                          gpus_per_node=1, cpu=True, main_process_port=free_port()))
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(MACHINE_RANK=str(rank), MAIN_PROCESS_IP="127.0.0.1", PATH=f"{VENV_BIN}{os.pathsep}{e['PATH']}")
        procs.append(subprocess.Popen(["bash", "-c", files["command"]], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert sum(log.count("KD gain over scratch") for log in logs) == 1, "the table is printed once per job"
    assert "KD gain over scratch" in logs[0], "global rank 0 (which writes every file) is on machine rank 0"
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2
    for stage in ("teacher", "scratch", "kd"):
        assert [p.name for p in (out / "checkpoints" / stage).iterdir()] == ["step_00000004"]
