"""A user error ends in one line on stderr, exit status 2 and no traceback; a programming error keeps
its traceback; VISREP_DEBUG=1 shows the traceback of user errors too."""
import errno
import subprocess
import sys

import pytest
import torch
from PIL import Image

from helpers import ROOT, env, run_in_process, run_recipe, write_preset
from visrep.data import CorruptImageError
from visrep.errors import EXIT_USER_ERROR, DiskWriteError, UserError, message_of, run_cli

TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "teacher": {"model": {"name": "resnet20", "kwargs": {"width": 0.25}}, "train_epochs": 1},
    "student": {"name": "resnet20", "kwargs": {"width": 0.25}}, "kd": {"allow_weaker_teacher": True},
    "schedule": {"epochs": 1}, "run": {"batch_size": 32, "progress": False},
}


def assert_one_clear_line(p, *needles):
    assert p.returncode == EXIT_USER_ERROR, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if l.startswith("visrep: error")]
    assert len(lines) == 1, p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _corrupt_folder(root):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.mark.slow
def test_recipe_user_errors_as_a_user_sees_them(tiny, tmp_path):
    """The real entry point, in a subprocess: a config error before anything starts, and a diverging
    run that fails mid-training (the rest are checked in process below, through the same run_cli)."""
    out = ["--output-dir", str(tmp_path / "run")]
    p = run_recipe("distill", ["--config", str(tiny), "--kd.temperature", "-1", *out], check=False)
    assert_one_clear_line(p, "kd.temperature", "-1.0")
    p = run_recipe("distill", ["--config", str(tiny), "--teacher.optim.lr", "1e8", *out], check=False)
    assert_one_clear_line(p, "non-finite loss", "stage 'teacher'", "optimizer step", "optim.lr")


@pytest.mark.parametrize("case", ["yaml", "unknown_key", "bad_choice", "corrupt_image", "pretrained",
                                  "nothing_to_resume", "not_a_checkpoint", "unknown_backbone", "output_dir_taken"])
def test_recipe_user_errors_are_one_line_without_traceback(tiny, tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("VISREP_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = ["--output-dir", str(tmp_path / "run")]
    if case == "yaml":
        broken = tmp_path / "broken.yaml"
        broken.write_text("kd: {temperature: 2\nrun: [")
        args, needles = ["--config", str(broken), *out], (str(broken), "not valid YAML")
    elif case == "unknown_key":
        bad = write_preset(tmp_path / "bad.yaml", {"kd": {"temprature": 2.0}})
        args, needles = ["--config", str(bad), *out], ("kd.temprature", str(bad), "temperature")
    elif case == "bad_choice":  # tyro's own usage error: its message, status 2, no traceback
        p = run_in_process("distill", ["--config", str(tiny), "--kd.targets", "medium", *out], capsys)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert "--kd.targets" in p.stderr and "hard" in p.stderr and "medium" in p.stderr
        return
    elif case == "corrupt_image":
        folder = _corrupt_folder(tmp_path / "imgs")
        args = ["--config", str(tiny), "--data.source", "imagefolder", "--data.data-dir", str(folder),
                "--data.label-fraction", "1.0", *out]
        needles = ("broken.png", "data.on_corrupt=skip")
    elif case == "pretrained":
        args = ["--config", str(tiny), "--teacher.source", "pretrained", "--teacher.model.name", "resnet18", *out]
        needles = ("resnet18", "checkpoint=")
    elif case == "nothing_to_resume":
        args, needles = ["--config", str(tiny), "--resume", "latest", *out], ("nothing to resume", str(tmp_path / "run"))
    elif case == "not_a_checkpoint":
        args = ["--config", str(tiny), "--resume", str(tmp_path / "gone" / "step_00000004")]
        needles = ("not a checkpoint directory", "step_00000004")
    elif case == "unknown_backbone":
        args, needles = ["--config", str(tiny), "--student.name", "resnet2O", *out], ("unknown backbone 'resnet2O'", "resnet20")
    else:
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        args, needles = ["--config", str(tiny), *out], ("already holds a run", "--resume latest")
    assert_one_clear_line(run_in_process("distill", args, capsys), *needles)


def test_cli_user_error_and_programming_error():
    def cmd(*args):
        return subprocess.run([sys.executable, "-m", "visrep.cli", *args], cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=300)

    p = cmd("zoo", "summary", "resnet2O")
    assert_one_clear_line(p, "unknown backbone 'resnet2O'")


def test_run_cli_sorts_errors(capsys, monkeypatch):
    monkeypatch.delenv("VISREP_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3

    def user():
        raise UserError("config key 'x' is wrong")

    assert run_cli(user) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "visrep: error: config key 'x' is wrong\n"

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl")

    assert run_cli(full) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ("visrep: error: cannot write '/data/run/metrics.jsonl': No space left on "
                                       "device. Free space on that disk or choose another --output-dir.\n")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda: 1 / 0)
    with pytest.raises(FileNotFoundError):  # not every OSError is the user's
        run_cli(lambda: open("/nonexistent/x"))
    monkeypatch.setenv("VISREP_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(user)
    monkeypatch.delenv("VISREP_DEBUG")
    # a config error is raised by every rank alike: only rank 0 reports it; a rank's own error names the rank
    from visrep.engine import ConfigError

    monkeypatch.setenv("RANK", "1")
    assert run_cli(lambda: (_ for _ in ()).throw(ConfigError("bad"))) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ""
    assert run_cli(lambda: (_ for _ in ()).throw(DiskWriteError("full"))) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "visrep: error [rank 1]: full\n"


def test_error_from_a_dataloader_worker_keeps_only_its_message():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise CorruptImageError(f"cannot read image 'img{i}.png': truncated. Repair or remove the file.")

    loader = torch.utils.data.DataLoader(Bad(), batch_size=2, num_workers=1)
    with pytest.raises(CorruptImageError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)
    assert message_of(err.value) == "cannot read image 'img0.png': truncated. Repair or remove the file."
