"""recipes/distill.py end to end: resume equality, 2 processes, teacher sources, errors."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from ds_helpers import load_recipe
from helpers import ROOT, run_recipe
from visrep.engine.run import read_metrics

TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "teacher": {"source": "train", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.5}},
                "train_epochs": 2, "optim": {"lr": 0.05}},
    "student": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "kd": {"temperature": 4.0, "kd_weight": 0.9, "allow_weaker_teacher": True},  # 2-epoch teachers: no guard
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}


def weights(run_dir, stage):
    return load_file(str(run_dir / "models" / stage / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """One uninterrupted 1-process run, the reference of every interrupted one in this module."""
    a = tmp_path_factory.mktemp("straight") / "a"
    p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(a)])
    return a, p


def assert_same_run(a, b):
    for stage in ("teacher", "scratch", "kd"):
        wa, wb = weights(a, stage), weights(b, stage)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wb[k], wa[k]), (stage, k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for k in ("teacher_acc", "student_scratch_acc", "student_kd_acc", "teacher_params", "student_params"):
        assert ra[k] == rb[k], k


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_resume_equals_straight_run(tiny, straight, tmp_path):
    """SIGKILL (no handler runs: an OOM kill, a node failure) at a random step of the scratch student,
    possibly while a checkpoint is being written; --resume latest ends bit-identical to the
    uninterrupted run."""
    import random
    import signal
    import subprocess

    from helpers import env

    a, b = straight[0], tmp_path / "b"
    at = random.randint(3, 12)  # of 18 steps per stage (9 batches of 32 per epoch, 2 epochs); step 2 is saved
    p = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "distill.py"), "--config", str(tiny),
                          "--output-dir", str(b), "--run.checkpoint-every", "2"], cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(b, "scratch", at, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (b / "results.json").exists()
    assert json.loads((b / "state.json").read_text())["stages"]["teacher"]["done"]
    p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(b), "--resume", "latest",
                               "--run.checkpoint-every", "2"])
    assert "resumed stage '" in p.stdout, f"killed at scratch step {at}:\n{p.stdout[-2000:]}"
    assert_same_run(a, b)
    ra = json.loads((a / "results.json").read_text())
    assert 0.0 <= ra["student_kd_acc"] <= 1.0 and ra["teacher_params"] > ra["student_params"]
    cfg = (a / "config.yaml").read_text()
    assert "temperature: 4.0" in cfg
    ckpt = sorted((a / "checkpoints" / "kd").iterdir())[-1]
    assert (ckpt / "config.yaml").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "manifest.json").is_file()


@pytest.fixture(scope="module")
def two_processes(tiny, tmp_path_factory):
    """One uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out)], processes=2)
    return out


@pytest.mark.slow
def test_two_processes_shard_data_and_write_one_checkpoint(tiny, two_processes, tmp_path):
    out = two_processes
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2
    state = json.loads((out / "state.json").read_text())
    # 9 global batches of 32 per epoch, split over 2 ranks -> 4 steps per epoch, 2 epochs
    assert state["stages"]["kd"]["steps"] == 8
    for stage in ("teacher", "scratch", "kd"):
        ckpts = [p.name for p in (out / "checkpoints" / stage).iterdir()]
        assert ckpts == ["step_00000008"] or sorted(ckpts) == ["step_00000004", "step_00000008"], ckpts
        last = out / "checkpoints" / stage / "step_00000008"
        assert len(list(last.glob("model*.safetensors"))) == 1
        assert sorted(p.name for p in last.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                             "random_states_1.pkl"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r.get("stage"), r.get("stage_step")) for r in lines if "train/loss" in r]
    assert len(keys) == len(set(keys)) == 3 * 8, "one metrics record per step, from the main process only"
    # gather_for_metrics counts each of the 270 test images once (the padded last batch is trimmed):
    # the same teacher scored by 1 process gives exactly the same accuracy.
    one = tmp_path / "one"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(one), "--schedule.epochs", "1",
                           "--teacher.source", "checkpoint", "--teacher.checkpoint", str(out / "models" / "teacher")])
    assert json.loads((one / "results.json").read_text())["teacher_acc"] == res["teacher_acc"]


@pytest.mark.slow
def test_teacher_sources(tiny, tmp_path):
    from test_hub import FAKE_TOKEN, HUB_FILES, FakeHub

    first = tmp_path / "first"
    with FakeHub() as hub:  # a local stand-in for the Hub API (HF_ENDPOINT): --push-to-hub sends one commit
        p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(first), "--schedule.epochs", "1",
                                   "--push-to-hub", "me/student"],
                       extra_env={"HF_ENDPOINT": hub.url, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "0",
                                  "HF_HOME": str(tmp_path / "hf_home")})
        assert len(hub.posts("/commit/")) == 1 and sorted(hub.repos["me/student"]) == sorted(HUB_FILES)
    assert FAKE_TOKEN not in p.stdout + p.stderr
    again = tmp_path / "from_ckpt"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(again), "--schedule.epochs", "1",
                           "--teacher.source", "checkpoint", "--teacher.checkpoint", str(first / "models" / "teacher")])
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (first, again))
    assert r1["teacher_acc"] == r2["teacher_acc"] and r2["teacher_wall_s"] == 0.0
    assert not (again / "checkpoints" / "teacher").exists()
    # bad input (a pretrained teacher offline, bad values, keys, YAML, an occupied run dir): tests/test_user_errors.py


def test_teacher_frozen_through_a_full_kd_training_step(tmp_path):
    from helpers import reset_accelerate

    from visrep.data import build_classification_data
    from visrep.distill import FrozenTeacher
    from visrep.engine import Run, from_dict
    from visrep.zoo import create_backbone, get_data_config

    recipe = load_recipe("distill")
    cfg = from_dict(recipe.DistillRecipeConfig, dict(TINY, output_dir=str(tmp_path / "run")))
    cfg.data.label_fraction = 0.05
    cfg.schedule.epochs = 1
    try:
        with Run(cfg, "distill", cfg.output_dir, 0, cfg.run) as run:
            net = create_backbone("resnet20", num_classes=10, small_input=True, width=0.5)
            teacher = FrozenTeacher(net).to(run.accelerator.device)
            before = {k: v.clone() for k, v in net.state_dict().items()}
            seen = []
            teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
            student = create_backbone("resnet20", num_classes=10, small_input=True, width=0.25)
            student_inputs = []
            student.register_forward_pre_hook(lambda m, args: student_inputs.append(args[0].clone())
                                              if m.training else None)
            data = build_classification_data(cfg.data, get_data_config(student), 0, 32, 64)
            recipe.train_classifier(run, cfg, data, "kd", student, cfg.student, cfg.optim, 1, teacher=teacher)
    finally:
        reset_accelerate()
    assert not teacher.training and not net.training
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    assert len(seen) >= len(student_inputs) > 0
    for s, t in zip(student_inputs, seen):
        assert torch.equal(s, t), "the teacher must see the student's augmented batch"


# ---------------------------------------------------------------- faults: preemption, determinism


def wait_for_step(run_dir, stage, step, proc, timeout=300):
    """Block until the run has logged ``step`` of ``stage`` (or the process ended)."""
    import time

    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(rec.get("stage") == stage and (rec.get("stage_step") or 0) >= step for _, rec in read_metrics(metrics)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {stage} step {step}: {proc.poll()}")


FAKE_SLURM = {
    # one srun task, in its own process group as slurmstepd runs a step
    "srun": 'while [ $# -gt 0 ] && [ "$1" != bash ]; do shift; done\nexport SLURM_NODEID=0\n'
            'setsid "$@" &\necho $! > "$FAKE_SLURM_DIR/step.pgid"\nwait $!\n',
    # scancel --signal=TERM JOB: signal every process of the job's steps (not the batch script)
    "scancel": '[ "$1" = --signal=TERM ] || exit 2\nkill -TERM -- -"$(cat "$FAKE_SLURM_DIR/step.pgid")"\n',
    "scontrol": 'case "$1" in show) echo 127.0.0.1 ;; requeue) echo "requeue $2" >> "$FAKE_SLURM_DIR/requeue.log" ;;'
                ' *) exit 2 ;; esac\n',
}


@pytest.mark.slow
def test_slurm_time_limit_checkpoints_requeues_and_resumes_equal(tiny, straight, tmp_path):
    """The generated sbatch script, run under stand-ins for srun/scancel/scontrol: SLURM's warning
    signal (USR1 to the batch script) -> SIGTERM to every process of the step -> the recipe finishes its
    step, writes a checkpoint and exits 75 -> the script requeues the job; the requeued job resumes with
    --resume latest and ends with the weights of the uninterrupted run."""
    import os
    import signal
    import subprocess

    from helpers import VENV_BIN, env
    from visrep.launch.accelerate_config import LaunchSpec, write_launch_files

    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/bin/bash\n" + body)
        (fake / name).chmod(0o755)
    out = tmp_path / "job"
    files = write_launch_files(LaunchSpec("distill", ["--config", str(tiny), "--output-dir", str(out)], slurm=True,
                                          requeue_before=60))
    e = env()
    e.update(PATH=f"{fake}{os.pathsep}{VENV_BIN}{os.pathsep}{e['PATH']}", FAKE_SLURM_DIR=str(fake),
             SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node1")

    def job():
        return subprocess.Popen(["bash", str(files["sbatch"])], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = job()
    wait_for_step(out, "scratch", 3, first)
    first.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@60
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-4000:]
    assert (fake / "requeue.log").read_text() == "requeue 42\n", log[-4000:]
    assert "stopped by SIGTERM after optimizer step" in log and "requeueing job 42" in log, log[-4000:]
    assert not (out / "results.json").exists()
    assert not json.loads((out / "state.json").read_text())["stages"].get("kd", {}).get("done")

    second = job()  # the requeued job: state.json is there, so it runs with --resume latest
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-4000:]
    assert "resumed stage" in log and (fake / "requeue.log").read_text() == "requeue 42\n"
    assert_same_run(straight[0], out)


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_after_the_same_step(tiny, two_processes, tmp_path):
    """2 processes: SIGTERM reaches rank 1 only; the flag travels with the per-step all-reduce, both
    ranks stop after the same step, one checkpoint is written; resumed, the run equals an
    uninterrupted 2-process run."""
    import signal
    import subprocess

    import psutil

    from helpers import ACCELERATE_LAUNCH, env, free_port

    out = tmp_path / "pre"

    port = str(free_port())
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", port, str(ROOT / "recipes" / "distill.py"),
           "--config", str(tiny), "--output-dir", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, "teacher", 2, p)
    ranks = {int(c.environ().get("RANK", -1)): c for c in psutil.Process(p.pid).children(recursive=True)
             if "distill.py" in " ".join(c.cmdline()) and c.environ().get("RANK") is not None}
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].send_signal(signal.SIGTERM)
    log = p.communicate(timeout=300)[0]
    assert p.returncode != 0
    assert log.count("visrep: stopped by") == 1, log[-4000:]  # rank 0 reports it, once
    from visrep.engine import list_checkpoints
    from visrep.engine.checkpoint import verify

    ckpts = list_checkpoints(out / "checkpoints" / "teacher")
    assert len(ckpts) == 1 and verify(ckpts[0]) is None, "one checkpoint, written after the agreed step"
    step = int(ckpts[0].name.split("_")[1])
    assert f"stopped by a signal to another rank after optimizer step {step} of stage 'teacher'" in log, log[-4000:]
    assert sorted(p.name for p in ckpts[0].glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                            "random_states_1.pkl"]
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out), "--resume", "latest"], processes=2)
    assert_same_run(two_processes, out)


@pytest.mark.slow
def test_same_seed_same_table(tiny, straight, tmp_path):
    """Two runs with the same seed on the same machine print the same table and end with the same weights."""
    again = tmp_path / "again"
    p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(again)])

    def table(stdout):
        return stdout[stdout.index("\nmodel"):stdout.index("training time:")]

    assert table(p.stdout) == table(straight[1].stdout)
    assert_same_run(straight[0], again)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (a real file system that fills up); skipped where mounting is not permitted --
    tests/test_faults.py injects the same failure everywhere."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_full_disk_stops_cleanly_and_the_run_continues_once_space_is_freed(tiny, straight, small_disk):
    import os

    from visrep.engine import list_checkpoints
    from visrep.engine.checkpoint import verify

    out = small_disk / "run"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out), "--run.stop-after-steps", "4"])
    before = list_checkpoints(out / "checkpoints" / "teacher")
    assert [c.name for c in before] == ["step_00000004"]
    filler = small_disk / "filler"
    st = os.statvfs(small_disk)
    with open(filler, "wb") as f:  # leave 64 KiB: metrics lines fit, a checkpoint does not
        while (left := os.statvfs(small_disk).f_bavail * st.f_frsize - 64 * 1024) > 0:
            f.write(b"\0" * min(left, 1 << 20))
            f.flush()
    p = run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out), "--resume", "latest"], check=False)
    line = [l for l in p.stderr.splitlines() if l.startswith("visrep: error")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(line) == 1, p.stderr[-3000:]
    assert f"in '{out}/checkpoints/teacher'" in line[0] and "step_00000004' is intact" in line[0], line[0]
    assert sorted(c.name for c in (out / "checkpoints" / "teacher").iterdir()) == ["step_00000004"], "no tmp dir"
    assert verify(before[0]) is None
    filler.unlink()
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out), "--resume", "latest"])
    assert_same_run(straight[0], out)


def test_check_teacher_refuses_a_weaker_teacher_unless_allowed(tmp_path):
    """The guard before the KD stage: equal or better passes; weaker stops with the figures and both ways
    out; kd.allow_weaker_teacher only warns."""
    from visrep.distill import WeakTeacherError, check_teacher

    printed = []
    check_teacher(0.9, 0.9, "resnet56", False, printed.append)
    with pytest.raises(WeakTeacherError, match=r"\(resnet56\) reaches validation accuracy 0\.6200, below the student "
                                               r"trained from scratch \(0\.8900\).*--kd.allow-weaker-teacher True") as e:
        check_teacher(0.62, 0.89, "resnet56", False, printed.append, f"--resume latest --output-dir {tmp_path}")
    assert e.value.same_on_every_rank and str(tmp_path) in str(e.value)
    check_teacher(0.62, 0.89, "resnet56", True, printed.append)
    assert "Distilling anyway" in printed[-1] and printed[0].startswith("[distill] validation accuracy: teacher 0.9000")


def test_default_preset_scales_the_learning_rates_with_the_global_batch():
    """digits.yaml: lr per 128 images, so 0.025 / 0.05 (teacher / student) at 32 x 1 process and twice that
    at 32 x 2; warmup in steps; the main job of the README: Digits-M at 16 px, a quarter-width student, T and
    weight as chosen on seed 0's validation split."""
    from visrep.engine.config import load_yaml

    mod = load_recipe("distill")
    cfg = load_yaml(mod.DistillRecipeConfig, ROOT / "recipes" / "configs" / "digits.yaml")
    assert [cfg.teacher.optim.peak_lr(32 * w) for w in (1, 2)] == [0.025, 0.05]
    assert [cfg.optim.peak_lr(32 * w) for w in (1, 2)] == [0.05, 0.1]
    assert cfg.schedule.warmup_steps == 40 and (cfg.kd.temperature, cfg.kd.kd_weight) == (4.0, 0.9)
    assert (cfg.data.source, cfg.data.image_size, cfg.student.kwargs) == ("digits_m", 16, {"width": 0.25})
