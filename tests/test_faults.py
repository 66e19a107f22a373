"""Faults in process: damaged checkpoints and exports, a full disk, SIGTERM -- each must end with the
weights of an uninterrupted run, or with one clear error and nothing half-written."""
import dataclasses
import errno
import json
import os
import signal

import pytest
import torch

from helpers import reset_accelerate as reset
from test_engine import ToyConfig, backward_and_step, mse, prepared_toy
from visrep.engine import Run, RunConfig, ScheduleConfig, StepSchedule, list_checkpoints
from visrep.engine.checkpoint import MANIFEST, verify, write_manifest
from visrep.errors import CheckpointError, DiskWriteError, Preempted


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def resume_fails(run_dir, cfg, resume: str, match: str) -> None:
    """Resuming the toy run in ``run_dir`` from ``resume`` is a CheckpointError matching ``match``."""
    with pytest.raises(CheckpointError, match=match):
        with Run(ToyConfig(), "toy", str(run_dir), 0, cfg, resume=resume) as run:
            train(run)
    reset()


def train(run, epochs=3, on_step=None, export=True):
    """A toy linear regression stage (6 optimizer steps per epoch) that exports on finish."""
    from safetensors.torch import save_file

    acc, model, opt, loader = prepared_toy(run)
    sched = StepSchedule(opt, ScheduleConfig(epochs=epochs, warmup_epochs=0.5), len(loader))

    def export_fn(d):
        if run.is_writer:
            save_file({k: v.contiguous() for k, v in acc.unwrap_model(model).state_dict().items()},
                      str(d / "model.safetensors"))

    stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=epochs, schedule=sched,
                      export=export_fn if export else None)
    for _ in stage.epochs():
        for x, y in stage.batches():
            loss = mse(model, x, y)
            backward_and_step(acc, opt, loss)
            if on_step is not None:
                on_step(stage)
            stage.step_done(loss)
        stage.epoch_done()
    stage.finish({})
    return {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def straight_run(tmp_path, cfg):
    with Run(ToyConfig(), "toy", str(tmp_path / "straight"), 0, cfg) as run:
        w = train(run)
    reset()
    return w


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ manifest


def test_manifest_detects_truncation_deletion_and_bit_flips(tmp_path):
    d = tmp_path / "ck"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"x" * 100)
    (d / "sub" / "b.json").write_text("{}")
    m = write_manifest(d)
    assert set(m["files"]) == {"a.bin", "sub/b.json"} and m["files"]["a.bin"]["size"] == 100
    assert verify(d) is None
    (d / "a.bin").write_bytes(b"x" * 99 + b"y")  # same size, other content
    assert "does not match its checksum" in verify(d)
    (d / "a.bin").write_bytes(b"x" * 50)
    assert verify(d) == "'a.bin' has 50 bytes, the manifest says 100"
    (d / "sub" / "b.json").unlink()
    assert "'sub/b.json' is missing" in verify(d) or "'a.bin'" in verify(d)
    (d / MANIFEST).unlink()
    assert "no manifest.json" in verify(d)


def _damage(path, how):
    if how == "truncate":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:37])
    elif how == "delete":
        (path / "optimizer.bin").unlink()
    elif how == "no-manifest":
        (path / MANIFEST).unlink()


@pytest.mark.parametrize("how", ["truncate", "delete", "no-manifest"])
def test_damaged_latest_checkpoint_falls_back_and_ends_equal(tmp_path, capsys, how):
    cfg = RunConfig(checkpoint_every=4, keep_last=2, progress=False)
    straight = straight_run(tmp_path, cfg)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, dataclasses.replace(cfg, stop_after_steps=10)) as run:
        train(run)
    reset()
    ckpts = list_checkpoints(tmp_path / "b" / "checkpoints" / "s")
    assert [c.name for c in ckpts] == ["step_00000008", "step_00000010"]
    _damage(ckpts[-1], how)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg, resume="latest") as run:
        resumed = train(run)
    err = capsys.readouterr().err
    assert f"checkpoint '{ckpts[-1]}' is damaged" in err and "falling back" in err
    assert_same(resumed, straight)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    cfg = RunConfig(checkpoint_every=4, keep_last=2, progress=False, stop_after_steps=10)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg) as run:
        train(run)
    reset()
    for c in list_checkpoints(tmp_path / "b" / "checkpoints" / "s"):
        _damage(c, "truncate")
    resume_fails(tmp_path / "b", cfg, "latest", r"no intact checkpoint of stage 's'.*step_00000010'.*"
                                                r"model.safetensors' has 37 bytes.*step_00000008.*Delete")
    reset()
    explicit = tmp_path / "b" / "checkpoints" / "s" / "step_00000008"
    resume_fails(tmp_path / "c", cfg, str(explicit), r"step_00000008' is damaged: 'model.safetensors' has 37 bytes")


def test_damaged_export_of_finished_stage_is_rebuilt_from_its_last_checkpoint(tmp_path, capsys):
    cfg = RunConfig(checkpoint_every=0, progress=False)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg) as run:
        straight = train(run)
    reset()
    export = tmp_path / "a" / "models" / "s"
    assert verify(export) is None
    (export / "model.safetensors").write_bytes(b"\0" * 8)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg, resume="latest") as run:
        again = train(run)
    assert "its export" in capsys.readouterr().out
    assert verify(export) is None
    assert_same(again, straight)
    from safetensors.torch import load_file
    assert_same(load_file(str(export / "model.safetensors")), straight)


# ------------------------------------------------------------------ full disk


@pytest.mark.parametrize("target", ["save_state", "manifest"])
def test_full_disk_stops_with_clear_error_and_keeps_previous_checkpoint(tmp_path, monkeypatch, target):
    cfg = RunConfig(checkpoint_every=4, keep_last=2, progress=False)
    calls = {"n": 0}
    import visrep.engine.checkpoint as ck

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    with pytest.raises(DiskWriteError) as err:
        with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg) as run:
            if target == "save_state":
                real = run.accelerator.save_state

                def flaky(path):
                    calls["n"] += 1
                    if calls["n"] == 2:
                        open(os.path.join(path, "partial.bin"), "wb").write(b"half")  # some bytes made it
                        enospc()
                    real(path)

                monkeypatch.setattr(run.accelerator, "save_state", flaky)
            else:
                real_manifest = ck.write_manifest

                def flaky_manifest(root):
                    calls["n"] += 1
                    return enospc() if calls["n"] == 2 else real_manifest(root)

                monkeypatch.setattr(ck, "write_manifest", flaky_manifest)
            train(run)
    d = tmp_path / "b" / "checkpoints" / "s"
    msg = str(err.value)
    assert f"in '{d}': No space left on device" in msg and "MiB free there" in msg
    assert "step_00000004' is intact" in msg and "--resume latest" in msg
    assert sorted(p.name for p in d.iterdir()) == ["step_00000004"], "no temporary directory left"
    assert verify(d / "step_00000004") is None


def test_full_disk_during_export(tmp_path, monkeypatch):
    cfg = RunConfig(checkpoint_every=0, progress=False)
    from safetensors import SafetensorError
    import safetensors.torch as st

    def full(*a, **k):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    with pytest.raises(DiskWriteError, match=r"export of stage 's' in '.*models'"):
        with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg) as run:
            monkeypatch.setattr(st, "save_file", full)
            train(run)
    assert not (tmp_path / "b" / "models" / "s").exists()
    assert not list((tmp_path / "b" / "models").glob(".tmp-*"))


# ------------------------------------------------------------------ preemption


@pytest.mark.parametrize("sig,at_step", [(signal.SIGTERM, 7), (signal.SIGUSR1, 2), (signal.SIGTERM, 17)])
def test_signal_checkpoints_after_the_step_and_resume_ends_equal(tmp_path, sig, at_step):
    cfg = RunConfig(checkpoint_every=0, keep_last=2, progress=False)
    straight = straight_run(tmp_path, cfg)

    def send(stage):
        if stage.run.global_step == at_step - 1:  # inside optimizer step `at_step`, before step_done
            os.kill(os.getpid(), sig)

    with pytest.raises(Preempted, match=rf"stopped by {sig.name} after optimizer step {at_step} of stage 's'"):
        with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg) as run:
            train(run, on_step=send)
    reset()
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler), "handler restored"
    ckpts = list_checkpoints(tmp_path / "b" / "checkpoints" / "s")
    assert ckpts[-1].name == f"step_{at_step:08d}" and verify(ckpts[-1]) is None
    ts = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert (ts["epoch"], ts["batch_in_epoch"]) == divmod(at_step, 6)
    with Run(ToyConfig(), "toy", str(tmp_path / "b"), 0, cfg, resume="latest") as run:
        resumed = train(run)
    assert_same(resumed, straight)


def test_deterministic_run_switches_deterministic_kernels_on(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with Run(ToyConfig(), "toy", str(tmp_path / "d"), 0, RunConfig(progress=False, deterministic=True)):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


def test_damaged_export_without_any_checkpoint_is_a_clear_error(tmp_path):
    cfg = RunConfig(checkpoint_every=0, progress=False)
    with Run(ToyConfig(), "toy", str(tmp_path / "a"), 0, cfg) as run:
        train(run)
    reset()
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "s")
    (tmp_path / "a" / "models" / "s" / "model.safetensors").unlink()
    resume_fails(tmp_path / "a", cfg, "latest", r"stage 's' is finished but its export .* is damaged and no "
                                                r"intact checkpoint of it remains .*state.json")
