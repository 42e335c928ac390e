"""The shared loop's step hygiene (issue 21): no host reads in a step (logs read every log_every steps), the
deferred non-finite verdict (same run as reading it at once, read only after the next step's forward), the
data-wait clock, torch.compile off on the CPU."""

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dfm_diffusers.training import LogWindow
from dfm_diffusers.training.loop import LoopConfig, run_training
from dfm_diffusers.training.steps import StepVerdict


class Regression(torch.utils.data.Dataset):
    """48 samples of y = x @ w; ``poisoned`` indices get inf inputs; ``delay`` seconds per read."""

    def __init__(self, poisoned=(), delay=0.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g)
        self.poisoned, self.delay = set(poisoned), delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        x = torch.full_like(self.x[i], float("inf")) if i in self.poisoned else self.x[i]
        return {"x": x, "y": self.y[i]}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def mse(model, batch):
    err = (model(batch["x"]) - batch["y"]).pow(2)
    return err.mean(), {"max_err": err.detach().max(), "pooled": (err.detach().sum(), torch.tensor(float(err.numel())))}


def config(out, **kwargs):
    base = dict(output_dir=str(out), max_train_steps=12, train_batch_size=8, learning_rate=1e-2, lr_scheduler="linear",
                checkpointing_steps=12, validation_steps=0, report_to=None, ema_decay=0.9, log_every=4,
                max_consecutive_nonfinite_steps=3)
    base.update(kwargs)
    return LoopConfig(**base)


def test_deferred_verdict_gives_the_run_of_an_immediate_one_and_is_read_after_the_next_forward(tmp_path, monkeypatch):
    """Fused AdamW, two poisoned samples (6 steps per epoch: 2 skipped steps per epoch), logs every 4 steps:
    reading each verdict one step later ends on exactly the weights, EMA, optimizer and lr-schedule state and log
    rows of reading it at once; a verdict of a step that is neither logged nor saved is read only after the next
    step's forward has run."""
    events = []
    read = StepVerdict.read

    def recording_read(self):
        if self._read is None:
            events.append(("read", self.step))
        return read(self)

    monkeypatch.setattr(StepVerdict, "read", recording_read)

    def loss_fn(model, batch):
        events.append(("forward", None))
        return mse(model, batch)

    results = {}
    for check in ("every_step", "deferred"):
        events.clear()
        out = tmp_path / check
        cfg = config(out, adam_fused=True, nonfinite_check=check)
        model = make_model()
        result = run_training(cfg, model, Regression(poisoned=[3, 30]), loss_fn)
        forwards = [i for i, (kind, _) in enumerate(events) if kind == "forward"]
        reads = {step: i for i, (kind, step) in enumerate(events) if kind == "read"}
        assert sorted(reads) == list(range(1, 13))
        for step in range(1, 13):
            after_next_forward = step < 12 and reads[step] > forwards[step]  # forwards[step]: step + 1's forward
            assert after_next_forward == (check == "deferred" and step not in (4, 8, 12)), (check, step)
        ckpt = out / "checkpoints" / "checkpoint-12"
        results[check] = dict(
            params=load_file(ckpt / "model.safetensors"), ema=load_file(ckpt / "ema.safetensors"),
            optimizer=torch.load(ckpt / "optimizer.bin", weights_only=True)["state"],
            scheduler=torch.load(ckpt / "scheduler.bin", weights_only=True)["last_epoch"],
            rows=[{k: v for k, v in r.items() if k not in ("it_per_s", "data_wait_s")} for r in result["log"]],
            nonfinite=result["nonfinite_steps"], loss=result["loss"],
        )
    now, later = results["every_step"], results["deferred"]
    assert now["nonfinite"] == later["nonfinite"] == 4 and now["scheduler"] == later["scheduler"] == 8
    assert now["rows"] == later["rows"] and now["loss"] == later["loss"]
    assert [r["step"] for r in now["rows"]] == sorted({4, 8, 12} | {r["step"] for r in now["rows"] if
                                                                     r["nonfinite_steps"] and r["step"] % 4})
    for key in ("params", "ema"):
        assert all(torch.equal(now[key][k], later[key][k]) for k in now[key])
    for i, state in now["optimizer"].items():
        assert int(state["step"]) == 8 and all(torch.equal(state[k], later["optimizer"][i][k]) for k in state)


@pytest.mark.parametrize("check", ["deferred", "every_step"])
def test_a_step_reads_nothing_from_the_device_but_its_verdict(tmp_path, monkeypatch, check):
    """Between two forwards (log rows every 100 steps), the loop reads one thing on the host: a step's non-finite
    verdict (2 flags, one ``tolist``; deferred: the previous step's, behind an event on CUDA); the loss, the logs
    and the gradient norm wait for the log row. (The fused AdamW: torch's foreach AdamW keeps its step counts on
    the host and reads them there by design, which on a GPU is no device read.)"""
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []

    def loss_fn(model, batch):
        per_step.append(list(reads))
        reads.clear()
        return mse(model, batch)

    run_training(config(tmp_path, adam_fused=True, nonfinite_check=check, log_every=100, max_train_steps=6,
                        checkpointing_steps=0), make_model(), Regression(), loss_fn)
    monkeypatch.undo()
    # steps 2..4 (step 1 follows the set-up; the end of the epoch reads the next epoch's shuffle on the CPU)
    assert per_step[2:5] == [["tolist"]] * 3, per_step


def test_log_window_reads_device_values_once_per_window(monkeypatch):
    window = LogWindow()
    window.add({"loss": torch.tensor(1.0), "mse_stage_1": (torch.tensor(0.0), torch.tensor(0.0)), "lr": 0.5})
    window.add({"loss": torch.tensor(3.0), "mse_stage_1": (torch.tensor(6.0), torch.tensor(2.0)), "lr": 1.5})
    window.add({"loss": torch.tensor(2.0, dtype=torch.float64), "mse_stage_1": (1.0, 1.0)})
    tolist = torch.Tensor.tolist
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or tolist(self))
    assert window.pop_means() == pytest.approx({"loss": 2.0, "mse_stage_1": 7.0 / 3.0, "lr": 1.0})
    assert len(calls) == 2  # the sums and the counts of the window's device values, one transfer each
    assert window.pop_means() == {}


def test_the_log_says_how_long_each_step_waited_for_its_data(tmp_path):
    """A data set that takes 10 ms per sample, batches of 8, no workers: each step waits ~80 ms for its batch."""
    result = run_training(config(tmp_path, max_train_steps=4, checkpointing_steps=0, log_every=2, use_ema=False),
                          make_model(), Regression(delay=0.01), mse)
    rows = result["log"]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert 0.5 * 8 * 0.01 <= row["data_wait_s"] <= 1 / row["it_per_s"], row


def test_torch_compile_is_off_on_the_cpu(tmp_path, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called on the CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.WARNING):
        result = run_training(config(tmp_path, max_train_steps=2, checkpointing_steps=0, torch_compile=True,
                                     torch_compile_objective=True, torch_compile_mode="max-autotune-no-cudagraphs"),
                              make_model(), Regression(), mse)
    assert result["global_step"] == 2 and "torch_compile is off on the CPU" in caplog.text
    assert config(tmp_path, torch_compile_objective=True).validate() == [
        "torch_compile_objective: needs torch_compile: true"]


@pytest.mark.gpu
def test_no_host_sync_in_a_dit_training_step_on_the_gpu(tmp_path):
    """On CUDA, a tiny DFM-DiT on preloaded data (on the device, random flips), bf16, fused AdamW, EMA: steps 2-5 run
    under torch.cuda.set_sync_debug_mode("error") (any synchronizing call raises)."""
    from accelerate.utils import set_seed

    from dfm_diffusers.data.preload import PreloadedDataset
    from dfm_diffusers.training.dit import DiTTask, DiTTrainingConfig, build_model

    g = torch.Generator().manual_seed(0)
    data = PreloadedDataset(None, torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (64,), generator=g), random_flip=True, placement="device")
    data.num_classes = 10  # (normally the source data set's)
    cfg = DiTTrainingConfig(output_dir=str(tmp_path), model="DFM-DiT-T/4", train_batch_size=16, max_train_steps=6,
                            model_kwargs=dict(num_layers=2), learning_rate=1e-4, checkpointing_steps=0,
                            validation_steps=0, log_every=100, report_to="none", stage_scales=None,
                            mixed_precision="bf16")
    set_seed(0)
    model = build_model(cfg, 1, 32, 10)
    task = DiTTask(cfg, model)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        torch.cuda.set_sync_debug_mode("error" if 2 <= len(calls) <= 5 else "default")
        return task.loss_fn(model, batch)

    try:
        result = run_training(cfg, model, data, loss_fn)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result["global_step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))
