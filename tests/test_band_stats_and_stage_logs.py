"""Band statistics (closed forms), stage_scales auto (config round trip, scale 1 changes nothing), the conditional
per-stage losses and their pooling over the log window (issue 9, items 1-2)."""

import json
import os

import pytest
import torch

from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMScheduler, LaplacianDecomposition
from dfm_diffusers.data import FASHION_MNIST_DIR, band_statistics
from dfm_diffusers.training import DFMObjectiveConfig, LogWindow, conditional_stage_losses, dfm_objective
from dfm_diffusers.training.objective import DFMTrainingSigmas


def checker(size: int, period: int = 1) -> torch.Tensor:
    """+-1 checkerboard [size, size] of period x period squares."""
    i = torch.arange(size) // period
    return ((i[:, None] + i[None, :]) % 2 * 2 - 1).float()


class Synthetic(torch.utils.data.Dataset):
    """x_n = a_n + c * checkerboard (1 channel, 32px), a_n ~ N(m, sd): with the 2x2-average / bilinear pyramid the
    stage-0 band is exactly a_n (16x16) and the detail band exactly c * checkerboard (its 2x2 mean is 0)."""

    def __init__(self, n=300, m=-0.3, sd=0.5, c=0.2, key="pixel_values"):
        self.a = m + sd * torch.randn(n, generator=torch.Generator().manual_seed(0))
        self.c, self.key = c, key
        self.num_classes = 3

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        x = self.a[i] + self.c * checker(32)[None]
        return {self.key: x, "class_labels": torch.tensor(i % 3)}


def expected_stats(a: torch.Tensor, c: float):
    a = a.double()
    mean0, std0 = a.mean().item(), a.std(unbiased=False).item()
    e0, e1 = 256 * (a**2).sum().item(), 1024 * c**2 * len(a)  # summed squares of each band
    return mean0, std0, e0 / (e0 + e1)


def test_band_statistics_match_the_closed_form():
    data = Synthetic(n=300)
    dec = LaplacianDecomposition(2, 2)
    bands = dec.decompose(data[5]["pixel_values"][None])
    torch.testing.assert_close(bands[0], data.a[5].expand(1, 1, 16, 16))  # the premise of the closed form
    torch.testing.assert_close(bands[1], 0.2 * checker(32)[None, None])

    stats = band_statistics(data, dec, num_samples=10_000, batch_size=64, progress=False)
    mean0, std0, frac0 = expected_stats(data.a, 0.2)
    assert stats.num_samples == 300 and stats.shapes == [[1, 16, 16], [1, 32, 32]]
    assert stats.mean == pytest.approx([mean0, 0.0], abs=1e-6)
    assert stats.std == pytest.approx([std0, 0.2], rel=1e-5)
    assert stats.energy_fraction == pytest.approx([frac0, 1 - frac0], rel=1e-5)
    assert stats.suggested_stage_scales("auto") == pytest.approx([std0, 0.2], rel=1e-5)
    assert stats.suggested_stage_scales("auto_relative") == pytest.approx([1.0, 0.2 / std0], rel=1e-5)
    with pytest.raises(ValueError, match="auto_relative"):
        stats.suggested_stage_scales("standardize")

    # a subset is a seeded random one (not the first examples), the same on every call
    sub = band_statistics(data, dec, num_samples=100, batch_size=32, progress=False)
    again = band_statistics(data, dec, num_samples=100, batch_size=7, progress=False)
    assert sub.num_samples == 100 and sub.std == pytest.approx(again.std, rel=1e-9)
    assert sub.std[0] != pytest.approx(expected_stats(data.a[:100], 0.2)[1], rel=1e-3)

    # the bands are always measured unscaled; an encoder (a callable "VAE") is applied first; tensors work too
    scaled = LaplacianDecomposition(2, 2, stage_scales=[3.0, 0.1])
    assert band_statistics(data, scaled, progress=False).std == pytest.approx(stats.std, rel=1e-5)
    doubled = band_statistics(data, dec, vae=lambda x: 2 * x, progress=False)
    assert doubled.std == pytest.approx([2 * std0, 0.4], rel=1e-5)
    tensor = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    assert band_statistics(tensor[:50], dec, progress=False).std[0] == pytest.approx(
        expected_stats(data.a[:50], 0.2)[1], rel=1e-5
    )
    batches = [{"pixel_values": tensor[:30]}, {"pixel_values": tensor[30:60]}, {"pixel_values": tensor[60:]}]
    first = band_statistics(batches, dec, num_samples=40, progress=False)  # an iterable: its first 40 examples
    assert first.num_samples == 40
    assert first.std[0] == pytest.approx(expected_stats(data.a[:40], 0.2)[1], rel=1e-5)


def test_band_stats_command(tmp_path, capsys):
    from dfm_diffusers.data.__main__ import main

    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST is not installed")
    path = tmp_path / "stats.json"
    assert main(["band-stats", "--dataset", "fashion_mnist", "--resolution", "32", "--num_stages", "2",
                 "--num_samples", "512", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["num_samples"] == 512 and result["space"] == "pixels"
    # measured on Fashion-MNIST in [-1, 1] at 32px (4096 images): stage 0 std 0.664, detail band 0.184
    assert result["std"] == pytest.approx([0.664, 0.184], abs=0.02)
    assert result["suggested_stage_scales"]["auto"] == result["std"]
    assert "stage_scales auto: [" in out and "stage_scales auto_relative: [1.0000, " in out


# ---------------------------------------------------------------------------------------- stage_scales auto


def tiny_dit(stage_scales=None):
    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset(
        "DFM-DiT-T/4", in_channels=1, sample_size=32, num_classes=3, num_layers=1, num_attention_heads=2,
        attention_head_dim=16, stage_scales=stage_scales,
    ).eval()
    with torch.no_grad():  # DiT's zero-init heads would make every output 0
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("mode", ["auto", "auto_relative"])
def test_stage_scales_auto_is_stored_in_the_model_config_and_survives_save_load(tmp_path, mode, capsys):
    from dfm_diffusers.training.dit import DiTTrainingConfig, build_model, resolve_stage_scales

    data = Synthetic(n=200)
    config = DiTTrainingConfig(model="DFM-DiT-T/4", model_kwargs=dict(num_layers=1, num_attention_heads=2,
                               attention_head_dim=16), stage_scales=mode, output_dir=str(tmp_path))
    model = build_model(config, in_channels=1, sample_size=32, num_classes=3)
    assert model.config.stage_scales is None  # "auto" is not a value the model can take: resolved below
    hparams = resolve_stage_scales(config, model, data)
    _, std0, _ = expected_stats(data.a, 0.2)
    expected = [std0, 0.2] if mode == "auto" else [1.0, 0.2 / std0]
    assert model.config.stage_scales == pytest.approx(expected, rel=1e-5)
    assert all(type(v) is float for v in model.config.stage_scales)
    assert hparams["stage_scale_1"] == pytest.approx(expected[1], rel=1e-5)
    assert "stage_scales = [" in capsys.readouterr().out

    DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2)).save_pretrained(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert saved["stage_scales"] == pytest.approx(expected, rel=1e-5)
    pipe = DFMDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.decomposition.stage_scales == pytest.approx(expected, rel=1e-5)
    x = data[0]["pixel_values"][None]
    plain = LaplacianDecomposition(2, 2).decompose(x)
    for band, ref, scale in zip(pipe.decomposition.decompose(x), plain, expected):
        torch.testing.assert_close(band, ref / scale)  # the DFM noise acts on the standardized bands


def test_bad_stage_scales_string_fails_before_data_is_read(tmp_path):
    from dfm_diffusers.training.dit import DiTTrainingConfig, train_dit

    config = DiTTrainingConfig(stage_scales="standardize", dataset=str(tmp_path / "missing"),
                               output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="auto_relative"):
        train_dit(config)


def test_scale_one_changes_nothing():
    x = torch.randn(3, 2, 32, 32)
    plain, ones = LaplacianDecomposition(2, 2), LaplacianDecomposition(2, 2, stage_scales=[1.0, 1.0])
    for a, b in zip(plain.decompose(x), ones.decompose(x)):
        assert torch.equal(a, b)
    bands = plain.decompose(x)
    assert torch.equal(plain.recompose(bands), ones.recompose(bands))

    def sample(scales):
        pipe = DFMDiTPipeline(transformer=tiny_dit(scales), scheduler=DFMScheduler(num_stages=2, steps_per_stage=[3, 2]))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(class_labels=[0, 2], generator=torch.Generator().manual_seed(0), output_type="pt",
                   return_previews=True)
        return out.images, out.previews[0]

    images, preview = sample(None)
    images_one, preview_one = sample([1.0, 1.0])
    torch.testing.assert_close(images_one, images, rtol=0, atol=1e-6)
    torch.testing.assert_close(preview_one, preview, rtol=0, atol=1e-6)
    images_scaled, _ = sample([0.66, 0.18])
    assert (images_scaled - images).abs().max() > 1e-2  # the scales really reach the sampler


# ------------------------------------------------------------------------------- conditional per-stage losses


def test_conditional_stage_losses_by_hand():
    # 5 samples, 2 stages; s* = [0, 1, 0, 1, 1]: stage 1 is in the loss of samples 1, 3, 4 only
    stage = torch.tensor([0, 1, 0, 1, 1])
    mask = (torch.arange(2)[None] <= stage[:, None]).float()
    draw = DFMTrainingSigmas(sigmas=torch.rand(5, 2), stage=stage, loss_mask=mask)
    mse = torch.tensor([[1.0, 9.0], [2.0, 4.0], [3.0, 9.0], [4.0, 6.0], [5.0, 8.0]])
    logs = conditional_stage_losses(mse, draw)
    assert logs["mse_stage_0"] == pytest.approx((15.0, 5.0))
    assert logs["mse_stage_1"] == pytest.approx((18.0, 3.0))  # mean 6, not the masked term 18 / 5
    assert logs["mse_generating_stage_0"] == pytest.approx((4.0, 2.0))  # samples 0 and 2
    assert logs["mse_generating_stage_1"] == pytest.approx((18.0, 3.0))


def test_objective_logs_are_the_masked_means_of_its_own_errors():
    torch.manual_seed(0)
    bands = [torch.randn(64, 1, 8, 8), torch.randn(64, 1, 16, 16)]
    config = DFMObjectiveConfig(stage_weights=[0.6, 0.4], stage_loss_weights=[1.0, 0.5])
    out = dfm_objective(config, bands, lambda inputs, draw: [torch.zeros_like(t) for t in inputs])
    logs = out.logs
    stage = out.draw.stage
    for s in range(2):
        err = out.targets[s].pow(2).mean(dim=(1, 2, 3))  # the prediction is 0
        active = stage >= s
        total, count = logs[f"mse_stage_{s}"]
        assert count == active.sum().item() and total / count == pytest.approx(err[active].mean().item(), rel=1e-5)
        total, count = logs[f"mse_generating_stage_{s}"]
        assert total / count == pytest.approx(err[stage == s].mean().item(), rel=1e-5)
        # the term summed into the loss stays the weighted masked mean over the whole batch
        w = [1.0, 0.5][s]
        assert logs[f"loss_stage_{s}"] == pytest.approx(w * (err * active).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(float(logs["loss_stage_0"] + logs["loss_stage_1"]), rel=1e-6)
    # 0-dim tensors, not floats: reading them would make every training step wait for the device
    assert all(torch.is_tensor(v) and v.ndim == 0 for value in logs.values()
               for v in (value if isinstance(value, tuple) else (value,)))


def test_log_window_averages_floats_and_pools_pairs():
    window = LogWindow()
    window.add({"loss": 1.0, "mse_stage_1": (0.0, 0.0)})  # stage 1 inactive in the whole batch
    window.add({"loss": 3.0, "mse_stage_1": (6.0, 2.0)})
    window.add({"loss": 2.0, "mse_stage_1": (1.0, 1.0), "grad": 4.0})
    assert window.pop_means() == pytest.approx({"loss": 2.0, "mse_stage_1": 7.0 / 3.0, "grad": 4.0})
    window.add({"mse_stage_1": (0.0, 0.0)})
    assert window.pop_means() == {}  # no active sample in the window: no value rather than a false 0


def test_training_log_rows_hold_window_means(tmp_path):
    """run_training's rows: every key averaged over the log_every steps since the previous row."""
    from dfm_diffusers.training.loop import LoopConfig, run_training

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"x": torch.ones(2)}

    calls = []

    def loss_fn(model, batch):
        calls.append(len(calls) + 1)
        step = calls[-1]
        loss = model(batch["x"]).pow(2).mean() * 0 + step  # the loss of step k is k
        return loss, {"k": float(step), "pooled": (float(step * step), float(step))}  # mean k over k samples

    config = LoopConfig(output_dir=str(tmp_path), max_train_steps=7, train_batch_size=4, log_every=3,
                        checkpointing_steps=0, validation_steps=0, report_to=None, use_ema=False)
    result = run_training(config, torch.nn.Linear(2, 1), Data(), loss_fn)
    rows = result["log"]
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["loss"] for r in rows] == pytest.approx([2.0, 5.0, 7.0])
    assert [r["k"] for r in rows] == pytest.approx([2.0, 5.0, 7.0])
    # pooled by sample count (step k: k samples of mean k), not a mean of the per-step means
    assert [r["pooled"] for r in rows] == pytest.approx([14 / 6, 77 / 15, 7.0])


def test_loss_curve_and_schedule_plots_are_matplotlib_pngs(tmp_path):
    from PIL import Image

    from dfm_diffusers.training.dit import write_loss_curve

    rows = [{"step": k, "loss": 1.0 / k, "mse_stage_0": 0.8 / k} for k in range(1, 50)]
    rows += [{"step": 50, "loss": 0.02, "mse_stage_0": 0.01, "mse_stage_1": 0.3}]
    path = tmp_path / "loss_curve.png"
    write_loss_curve(rows, str(path), num_stages=2)
    image = Image.open(path)
    assert image.size == (640, 400) and len(set(image.convert("RGB").getdata())) > 20  # anti-aliased lines


def test_stage_scales_auto_is_the_dit_default_and_leaves_one_stage_plain_flow_matching(tmp_path):
    """RESULTS.md: standardized bands beat bands as they are; with 1 stage auto changes nothing (the FM baseline)."""
    from dfm_diffusers.training.dit import DiTTrainingConfig, build_model, resolve_stage_scales

    assert DiTTrainingConfig().stage_scales == "auto"
    config = DiTTrainingConfig(model="DiT-T/4", model_kwargs=dict(num_layers=1, num_attention_heads=2,
                               attention_head_dim=16), output_dir=str(tmp_path))
    model = build_model(config, in_channels=1, sample_size=32, num_classes=3)
    assert model.config.num_stages == 1
    assert resolve_stage_scales(config, model, Synthetic(n=50)) == {}
    assert model.config.stage_scales is None
