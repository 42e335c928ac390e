"""A newcomer's path without tracebacks: one message and an exit status for user errors, a run that refuses to
overwrite an earlier one, Ctrl+C that saves and says how to resume, a quiet and fast ``import dfm_diffusers``."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dfm_diffusers.training.checkpointing import OutputDirInUseError, TrainingInterrupted
from dfm_diffusers.training.config import ConfigError, run_cli
from dfm_diffusers.training.loop import LoopConfig, run_training

ROOT = Path(__file__).resolve().parents[1]


class Regression(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def train(out, steps, interrupt_at=(), **overrides):
    """A tiny run; ``interrupt_at``: steps whose loss computation sends this process SIGINT (Ctrl+C), once per
    occurrence."""
    config = LoopConfig(output_dir=str(out), max_train_steps=steps, train_batch_size=4, learning_rate=1e-2,
                        checkpointing_steps=100, validation_steps=0, report_to=None, log_every=1, **overrides)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        for _ in range(list(interrupt_at).count(calls["n"])):
            os.kill(os.getpid(), signal.SIGINT)
        return (model(batch["x"]) - batch["y"]).pow(2).mean(), {}

    return model, run_training(config, model, Regression(), loss_fn)


def test_a_second_run_into_the_same_folder_is_refused_unless_asked(tmp_path):
    train(tmp_path, 3)
    with pytest.raises(OutputDirInUseError, match="holds a previous run .*pipeline|holds a previous run") as err:
        train(tmp_path, 3)
    message = str(err.value)
    assert "checkpoints up to step 3" in message and "--resume_from_checkpoint latest" in message
    assert "--overwrite_output_dir true" in message
    _, result = train(tmp_path, 2, overwrite_output_dir=True)  # starts over: the old checkpoint is gone
    assert result["global_step"] == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2"]
    _, result = train(tmp_path, 4, resume_from_checkpoint="latest")  # resuming is allowed
    assert result["global_step"] == 4 and len(result["log"]) == 4


def test_first_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    reference, _ = train(tmp_path / "whole", 8)
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a background job
    with pytest.raises(TrainingInterrupted, match="interrupted after step 3.*--resume_from_checkpoint latest"):
        train(tmp_path / "cut", 8, interrupt_at=(3,))
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["checkpoint-3"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back
    resumed, result = train(tmp_path / "cut", 8, resume_from_checkpoint="latest")
    assert result["global_step"] == 8
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_second_ctrl_c_aborts_at_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, 8, interrupt_at=(3, 3))  # the second arrives inside the step the first lets finish
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("error, status, text", [
    (OutputDirInUseError("out holds a previous run"), 1, "error: out holds a previous run"),
    (FileNotFoundError("no data set at data/"), 1, "error: no data set at data/"),
    (ConfigError(["learning_rate: must be > 0"]), 2, "  learning_rate: must be > 0"),
    (TrainingInterrupted("interrupted after step 3"), 130, "interrupted after step 3"),
    (KeyboardInterrupt(), 130, "aborted (Ctrl+C)"),
])
def test_cli_user_errors_are_one_message_and_a_status(error, status, text, monkeypatch, capsys):
    def main():
        raise error

    monkeypatch.setattr(sys, "argv", ["train_dfm_dit.py", "--output_dir", "out"])
    with pytest.raises(SystemExit) as done:
        run_cli(main)
    assert done.value.code == status
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["train_dfm_dit.py", "--debug", "--output_dir", "out"])
    seen = []
    if status != 130 or isinstance(error, KeyboardInterrupt):
        with pytest.raises(type(error)):  # --debug: the exception itself, and main() does not see --debug
            run_cli(lambda: seen.append(list(sys.argv)) or main())
        assert seen == [["train_dfm_dit.py", "--output_dir", "out"]]


def test_pipeline_paths_that_do_not_exist_or_are_lora_exports(tmp_path):
    from dfm_diffusers import DFMPipeline

    for typo in ["./no-such-folder", str(tmp_path / "missing"), "outputs/run/pipeline"]:
        with pytest.raises(ValueError, match="folder not found"):
            DFMPipeline.from_pretrained(typo)
    (tmp_path / "dfm_lora_config.json").write_text(json.dumps({"format": "dfm-lora-export"}))
    with pytest.raises(ValueError, match=r"DFM LoRA export .* DFMPipeline.from_lora_export"):
        DFMPipeline.from_pretrained(tmp_path)


def test_quickstart_finds_its_config_from_any_folder(tmp_path, monkeypatch, capsys):
    from dfm_diffusers import quickstart

    assert os.path.isabs(quickstart.DEFAULT_CONFIG) and os.path.isfile(quickstart.DEFAULT_CONFIG)
    monkeypatch.chdir(tmp_path)
    assert quickstart.main(["--config", "nowhere.yaml"]) == 2
    assert "config nowhere.yaml not found" in capsys.readouterr().err


def test_readme_uses_dtype_not_the_deprecated_torch_dtype():
    code = (ROOT / "README.md").read_text()
    assert "torch_dtype=" not in code


def test_import_is_quiet_and_lazy(tmp_path):
    """`import dfm_diffusers` imports neither torch nor diffusers; DiT-only use does not import FLUX's pipeline, and
    neither prints the dependencies' import-time warnings (bitsandbytes' CPU kernels, torchvision processors)."""
    script = (
        "import sys, time, json\n"
        "t = time.perf_counter(); import dfm_diffusers; bare = time.perf_counter() - t\n"
        "lazy = 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMScheduler\n"
        "flux = 'diffusers.pipelines.flux.pipeline_flux' in sys.modules\n"
        "print(json.dumps({'bare': bare, 'lazy': lazy, 'flux': flux}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lazy"] and not result["flux"]
    assert result["bare"] < 1.0  # seconds: nothing heavy is imported
    assert done.stderr.strip() == ""


def test_trainer_with_a_missing_data_set_ends_in_one_message(tmp_path):
    """The real command line: a missing data set is one message naming it and exit status 1, no traceback and no
    dependency warnings."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_dfm_dit.py"), "--dataset", str(tmp_path / "no-such-data"),
         "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--report_to", "none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("train_dfm_dit.py: error: could not load dataset") and "no-such-data" in lines[0]
    assert lines[1:] == ["(run again with --debug for the traceback)"] and "Traceback" not in done.stderr
