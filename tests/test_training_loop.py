"""The shared training loop with frozen parameters: checkpoints hold only the trainable ones, and resume exactly."""

import os

import torch
from torch import nn

from dfm_diffusers.training.loop import TRAINABLE_CHECKPOINT_FILE, LoopConfig, run_training


class Regression(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    model[0].requires_grad_(False)  # a frozen "base"
    return model


def loss_fn(model, batch):
    loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
    return loss, {}


def train(out, steps, resume=None):
    config = LoopConfig(output_dir=str(out), max_train_steps=steps, train_batch_size=8, learning_rate=1e-2,
                        checkpointing_steps=3, checkpoints_total_limit=None, validation_steps=0, report_to=None,
                        ema_decay=0.9, resume_from_checkpoint=resume, log_every=1)
    model = make_model()
    result = run_training(config, model, Regression(), loss_fn)
    return model, result


def test_frozen_parameters_stay_out_of_checkpoints_and_resume_is_exact(tmp_path):
    full, result = train(tmp_path / "full", 10)
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint-9"
    files = os.listdir(ckpt)
    assert TRAINABLE_CHECKPOINT_FILE in files and "model.safetensors" not in files
    from safetensors.torch import load_file

    saved = load_file(ckpt / TRAINABLE_CHECKPOINT_FILE)
    assert set(saved) == {"2.weight", "2.bias"}
    data = Regression()
    with torch.no_grad():
        assert loss_fn(full, {"x": data.x, "y": data.y})[0] < loss_fn(make_model(), {"x": data.x, "y": data.y})[0]
    assert len(result["log"]) == 10

    train(tmp_path / "split", 6)
    resumed, _ = train(tmp_path / "split", 10, resume="latest")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(full[0].weight, make_model()[0].weight, rtol=0, atol=0)  # the base never moved
