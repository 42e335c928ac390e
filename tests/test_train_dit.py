"""End-to-end tests of train_dfm_dit.py (issue 5): tiny runs of the real script on a Fashion-MNIST subset.

Four subprocess runs in all (each pays ~9 s of torch/diffusers imports, so three start together): one 60-step run
for "the loss goes down" and the exported pipeline, and an uninterrupted run plus a stopped-then-resumed pair for
exact resumption.
The S = 1 baseline and the bad-input errors run in-process through ``train_dfm_dit.main``.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dfm_diffusers.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_dfm_dit.py"
TINY_KWARGS = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32)
TINY = "{num_layers: 2, num_attention_heads: 2, attention_head_dim: 32}"
# A 2-stage 32px model (stages 16x16 and 32x32) with fast sampling; no trackers.
COMMON = ["--model", "DFM-DiT-T/4", "--model_kwargs", TINY, "--report_to", "none", "--steps_per_stage", "[3, 2]"]

HAVE_FM = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fm = pytest.mark.skipif(
    not HAVE_FM, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`"
)


def _script_module():
    spec = importlib.util.spec_from_file_location("train_dfm_dit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptRun:
    """``python train_dfm_dit.py --output_dir DIR <COMMON> <args>`` started in the background (offline env inherited).

    One intra-op thread per run: two or three runs then share the 2 cores of CI without OpenMP's busy-waiting
    threads slowing each other down many times over, and every run of a comparison uses the same thread count.
    """

    def __init__(self, output_dir, *args):
        self.output_dir = Path(output_dir)
        self.log = self.output_dir.parent / f"{self.output_dir.name}.{time.monotonic_ns()}.out"
        env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
        self.cmd = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *COMMON, *map(str, args)]
        self.start = time.perf_counter()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 300) -> str:
        """Wait for the run; its output (stdout and stderr). Fails the test if the script failed."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        output = self.log.read_text()
        print(f"{' '.join(self.cmd[2:])}: {time.perf_counter() - self.start:.1f} s")
        assert self.proc.returncode == 0, f"train_dfm_dit.py failed ({self.proc.returncode}):\n{output[-8000:]}"
        return output

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def read_log(output_dir) -> list[dict]:
    with open(Path(output_dir) / "training_log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ema_params(checkpoint) -> dict[str, torch.Tensor]:
    """The EMA shadow parameters of diffusers' EMAModel, by parameter name (ema.safetensors; no pickle)."""
    assert not list(Path(checkpoint).glob("*custom_checkpoint*"))
    return load_file(Path(checkpoint) / "ema.safetensors")


# ------------------------------------------------------------------------------------ loss goes down, export


RESUME_ARGS = [
    "--max_samples", 256, "--train_batch_size", 32, "--learning_rate", "1e-3", "--log_every", 1,
    "--checkpointing_steps", 5, "--validation_steps", 6, "--random_flip", "true", "--seed", 3,
]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """The four runs of the real script, the independent ones started together (2 cores, 1 thread each).

    - "trained": 60 steps of the 2-stage model on 512 Fashion-MNIST images; checkpoint and pipeline at the end.
      Its learning rate is written "1e-3" on purpose: YAML 1.1 reads that as a string.
    - "full": 12 steps without interruption, checkpoints every 5 steps.
    - "resumed": the same settings stopped after step 7 (checkpoints at 5 and 7), the step-7 save then turned into
      what a kill during the save leaves behind, and resumed from "latest" up to step 12.
    256 images in batches of 32 = 8 steps per epoch: the resume at step 5 is mid-epoch (skip_first_batches) and
    the run crosses an epoch boundary. Random flips are on (augmentation RNG) and a sample grid is drawn at step
    6 (after the resume point), so that neither may shift the training RNG stream.
    """
    if not HAVE_FM:
        pytest.skip("Fashion-MNIST is not installed")
    root = tmp_path_factory.mktemp("dit-runs")
    runs = {
        "trained": ScriptRun(
            root / "trained", "--max_samples", 512, "--train_batch_size", 32, "--max_train_steps", 60,
            "--learning_rate", "1e-3", "--log_every", 1, "--checkpointing_steps", 1000, "--validation_steps", 0,
            "--seed", 0,
        ),
        "full": ScriptRun(root / "full", *RESUME_ARGS, "--max_train_steps", 12),
        "stopped": ScriptRun(root / "resumed", *RESUME_ARGS, "--max_train_steps", 7),
    }
    try:
        yield runs
    finally:
        for run in runs.values():
            run.stop()


@pytest.fixture(scope="module")
def trained(script_runs):
    run = script_runs["trained"]
    run.wait()
    return run.output_dir


@pytest.fixture(scope="module")
def resumed_pair(script_runs):
    """(uninterrupted run folder, stopped-killed-resumed run folder, output of the resuming run)."""
    full = script_runs["full"]
    stopped = script_runs["stopped"]
    stopped.wait()
    resumed = stopped.output_dir
    checkpoints = resumed / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-5", "checkpoint-7"]
    # Simulate a process killed while saving step 7: its folder is left under the temporary name, half written.
    os.replace(checkpoints / "checkpoint-7", checkpoints / "checkpoint-7.tmp")
    weights = checkpoints / "checkpoint-7.tmp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Resume after the fact with a larger step budget, as a user would after the kill.
    resuming = script_runs["resuming"] = ScriptRun(
        resumed, *RESUME_ARGS, "--max_train_steps", 12, "--resume_from_checkpoint", "latest"
    )
    output = resuming.wait()
    full.wait()
    return full.output_dir, resumed, output


@pytest.mark.slow
@needs_fm
def test_loss_goes_down(trained):
    log = read_log(trained)
    assert [r["step"] for r in log] == list(range(1, 61))
    for row in log:
        assert {"loss_stage_0", "loss_stage_1"} <= set(row) and "loss_stage_2" not in row
        assert row["loss"] == pytest.approx(row["loss_stage_0"] + row["loss_stage_1"], rel=1e-5)
        assert row["lr"] == pytest.approx(1e-3)
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    # measured: about 1.6 -> 0.7; a model that does not learn stays near 1.6 (predicting 0 gives E|eps - x|^2)
    assert last < 0.8 * first, (first, last)
    assert (trained / "loss_curve.png").is_file()
    assert (trained / "samples" / "step_0000060.png").is_file()


@pytest.mark.slow
@needs_fm
def test_exported_pipeline_loads_generates_and_holds_ema_weights(trained):
    from dfm_diffusers.pipelines import DFMDiTPipeline

    pipe = DFMDiTPipeline.from_pretrained(trained / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    assert transformer.config.num_stages == 2 and transformer.config.sample_size == 32
    assert transformer.config.in_channels == 1 and transformer.config.num_classes == 10

    out = pipe(class_labels=[0, 5, 9], generator=torch.Generator().manual_seed(0), output_type="pt", return_previews=True)
    assert out.images.shape == (3, 1, 32, 32)
    assert [tuple(p.shape) for p in out.previews] == [(3, 1, 16, 16), (3, 1, 32, 32)]
    assert torch.equal(out.previews[-1], out.images)
    assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    assert out.images.std() > 0.01  # not a constant image
    pil = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (32, 32)

    # The exported weights are the EMA weights of the final checkpoint, not the raw trained ones.
    checkpoint = trained / "checkpoints" / "checkpoint-60"
    exported = dict(transformer.named_parameters())
    ema = ema_params(checkpoint)
    assert set(exported) == set(ema)
    assert all(torch.equal(exported[name].detach(), ema[name]) for name in ema)
    raw = load_file(checkpoint / "model.safetensors")
    state = transformer.state_dict()
    assert set(raw) == set(state)
    assert any(not torch.equal(raw[k], state[k]) for k in raw)


# ------------------------------------------------------------------------------------------- exact resumption


@pytest.mark.slow
@needs_fm
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(resumed_pair):
    full, resumed, output = resumed_pair
    # 'latest' is the newest *completed* checkpoint: step 5, not the half-written checkpoint-7.tmp.
    assert f"resumed from {resumed / 'checkpoints' / 'checkpoint-5'} at step 5" in output
    a, b = full / "checkpoints" / "checkpoint-12", resumed / "checkpoints" / "checkpoint-12"
    model_a, model_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(model_a) == set(model_b)
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    ema_a, ema_b = ema_params(a), ema_params(b)
    assert set(ema_a) == set(model_a) == set(ema_b)
    assert all(torch.equal(ema_a[name], ema_b[name]) for name in ema_a)
    # the optimizer moments too (the next step would diverge otherwise)
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) and torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"])
    # ... and so the exported pipelines
    export_a = load_file(full / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    export_b = load_file(resumed / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(export_a[k], export_b[k]) for k in export_a)


@pytest.mark.slow
@needs_fm
def test_resume_replays_the_same_steps_and_keeps_one_log(resumed_pair):
    full, resumed, _ = resumed_pair
    log_a, log_b = read_log(full), read_log(resumed)
    # the rows of steps 6 and 7 of the stopped run were dropped on resume, then written again
    assert [r["step"] for r in log_b] == list(range(1, 13))
    for ra, rb in zip(log_a, log_b):
        for key in ("step", "loss", "loss_stage_0", "loss_stage_1", "lr", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    # the losses are not all alike (a run that never changes would also 'match')
    assert len({r["loss"] for r in log_a}) == 12


@pytest.mark.slow
@needs_fm
def test_killed_save_leaves_the_good_checkpoints_alone(resumed_pair):
    _, resumed, _ = resumed_pair
    names = sorted(os.listdir(resumed / "checkpoints"))
    # checkpoints_total_limit 2 keeps the two newest completed ones; the leftover .tmp is never taken for one
    assert [n for n in names if not n.endswith(".tmp")] == ["checkpoint-10", "checkpoint-12"]
    assert load_file(resumed / "checkpoints" / "checkpoint-12" / "model.safetensors")


def test_latest_checkpoint_ignores_temporary_folders(tmp_path):
    from dfm_diffusers.training.checkpointing import write_manifest
    from dfm_diffusers.training.loop import list_checkpoints, resolve_resume_path

    for name in ("checkpoint-5", "checkpoint-20", "checkpoint-30.tmp", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
        write_manifest(tmp_path / name, 0)
    (tmp_path / "checkpoint-40").write_text("a file, not a folder")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 20]
    assert resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert resolve_resume_path("latest", str(tmp_path / "missing")) is None
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_resume_path(str(tmp_path / "checkpoint-30"), str(tmp_path))


def test_a_save_killed_midway_keeps_the_previous_checkpoint_and_resume_skips_it(tmp_path, monkeypatch):
    """The shared loop writes checkpoint-N.tmp and renames it: a save dying half-way leaves checkpoint-(N-k) usable."""
    from accelerate import Accelerator

    from dfm_diffusers.training.loop import LoopConfig, list_checkpoints, run_training

    real_save, calls = Accelerator.save_state, []

    class Killed(BaseException):
        """Stands for a kill: not an Exception, so the loop's clean-up after failed saves does not run."""

    def dying_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the save of step 4 dies after writing part of its files
            os.makedirs(output_dir, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise Killed("killed while saving")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    config = LoopConfig(
        output_dir=str(tmp_path), max_train_steps=6, checkpointing_steps=2, train_batch_size=4, report_to="none",
        validation_steps=0, log_every=1,
    )
    data = [{"x": torch.randn(3)} for _ in range(16)]

    def loss_fn(model, batch):
        return (model(batch["x"]) ** 2).mean(), {}

    torch.manual_seed(0)
    with pytest.raises(Killed, match="killed while saving"):
        run_training(config, torch.nn.Linear(3, 1), data, loss_fn)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2]
    before = read_log(tmp_path)
    assert [r["step"] for r in before] == [1, 2, 3, 4]

    monkeypatch.undo()
    config.resume_from_checkpoint = "latest"
    result = run_training(config, torch.nn.Linear(3, 1), data, loss_fn)
    assert result["global_step"] == 6 and [r["step"] for r in result["log"]] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in result["log"][:4]] == [r["loss"] for r in before]  # steps 3, 4 replayed exactly
    # the step-4 save was redone in full (the leftover .tmp replaced), and the limit of 2 kept the newest two
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-4", "checkpoint-6"]
    assert load_file(checkpoints / "checkpoint-4" / "model.safetensors")


def test_augmentation_rng_is_per_sample_and_leaves_the_global_rng_alone():
    from dfm_diffusers.training.loop import SeededSamples

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.rand(())

    data = SeededSamples(Draws(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    epoch0 = torch.stack([data[i] for i in range(64)])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.stack([data[i] for i in reversed(range(64))]).flip(0), epoch0)  # order-free
    assert len(set(epoch0.tolist())) == 64 and 0.25 < epoch0.mean() < 0.75
    data.epoch = 1
    epoch1 = torch.stack([data[i] for i in range(64)])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(torch.stack([SeededSamples(Draws(), seed=8)[i] for i in range(64)]), epoch0)


# ------------------------------------------------------------------------------- S = 1: plain flow matching


def test_one_stage_loss_is_plain_flow_matching():
    """DiTTask.loss_fn of a 1-stage model == mean((v_hat - (eps - x))^2) with x_sigma = (1 - sigma) x + sigma eps.

    The reference does not replay the loss's random draws: it reads sigma and the noisy input the model was given,
    recovers eps from them, and checks the loss and the conditioning against the plain flow-matching formulas.
    """
    from dfm_diffusers.training.dit import DiTTask, DiTTrainingConfig, build_model

    config = DiTTrainingConfig(model="DiT-T/4", model_kwargs=TINY_KWARGS, output_dir="unused", steps_per_stage=[4])
    torch.manual_seed(0)
    model = build_model(config, in_channels=1, sample_size=32, num_classes=10)
    assert model.config.num_stages == 1
    with torch.no_grad():  # leave DiT's zero init so that the prediction is not identically 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    task = DiTTask(config, model)
    x = torch.rand(64, 1, 32, 32) * 2 - 1
    batch = {"pixel_values": x, "class_labels": torch.randint(0, 10, (64,))}
    seen = {}

    def recording_model(inputs, **kwargs):
        pred = model(inputs, **kwargs)
        seen.update(inputs=inputs, pred=pred[0], **kwargs)
        return pred

    loss, logs = task.loss_fn(recording_model, batch)
    assert len(seen["inputs"]) == 1 and len(seen["pred"]) == 1
    assert seen["num_active_stages"].tolist() == [1] * 64
    assert torch.equal(seen["class_labels"], batch["class_labels"])
    sigma = seen["timestep"]
    assert sigma.shape == (64, 1) and (sigma > 0).all() and (sigma < 1).all() and sigma.std() > 0.05
    s = sigma.view(-1, 1, 1, 1)
    x_sigma, pred = seen["inputs"][0], seen["pred"][0]
    eps = (x_sigma - (1 - s) * x) / s
    assert abs(eps.mean()) < 0.05 and 0.95 < eps.std() < 1.05  # the noise really is N(0, 1)
    expected = F.mse_loss(pred.float(), eps - x)
    assert pred.abs().mean() > 0.01
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert logs == {"loss_stage_0": pytest.approx(loss.item()), "mse_stage_0": (pytest.approx(64 * loss.item()), 64)}


@needs_fm
def test_one_stage_model_trains_through_the_script(tmp_path):
    """``--model DiT-T/4`` trains and exports a one-stage pipeline; the log has only the stage-0 term."""
    from dfm_diffusers.pipelines import DFMDiTPipeline

    out = tmp_path / "dit-s1"
    _script_module().main([str(a) for a in [
        "--output_dir", out, "--model", "DiT-T/4", "--model_kwargs", TINY, "--report_to", "none",
        "--steps_per_stage", "[4]", "--max_samples", 64, "--train_batch_size", 16, "--max_train_steps", 4,
        "--log_every", 1, "--learning_rate", "1e-3", "--checkpointing_steps", 0, "--validation_steps", 0,
    ]])
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for row in log:
        assert sorted(k for k in row if k.startswith("loss_stage_")) == ["loss_stage_0"]
        assert row["loss"] == pytest.approx(row["loss_stage_0"], rel=1e-6)
    assert all(r["mse_stage_0"] == pytest.approx(r["loss"], rel=1e-5) for r in log)  # one stage: always active
    assert not (out / "checkpoints").exists()  # checkpointing_steps 0: no checkpoints
    pipe = DFMDiTPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_stages == 1
    result = pipe(class_labels=[2, 3], generator=torch.Generator().manual_seed(0), output_type="pt", return_previews=True)
    assert result.images.shape == (2, 1, 32, 32)
    assert len(result.previews) == 1 and torch.equal(result.previews[0], result.images)


@needs_fm
def test_stage_scales_auto_through_the_script(tmp_path, capsys):
    """``--stage_scales auto``: the scales are estimated from the training images before training, printed,
    stored in the exported pipeline's transformer config, and the log holds the conditional per-stage losses."""
    from dfm_diffusers.data import band_statistics, build_image_dataset
    from dfm_diffusers.decomposition import LaplacianDecomposition
    from dfm_diffusers.pipelines import DFMDiTPipeline

    out = tmp_path / "auto"
    _script_module().main([str(a) for a in [
        "--output_dir", out, *COMMON, "--stage_scales", "auto", "--stage_scales_samples", 128, "--max_samples", 128,
        "--train_batch_size", 32, "--max_train_steps", 4, "--log_every", 2, "--checkpointing_steps", 0,
        "--validation_steps", 0,
    ]])
    expected = band_statistics(build_image_dataset("fashion_mnist", 32, max_samples=128), LaplacianDecomposition(2, 2),
                               progress=False).std
    assert "stage_scales = [" in capsys.readouterr().out
    pipe = DFMDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.transformer.config.stage_scales == pytest.approx(expected, rel=1e-5)
    assert pipe.decomposition.stage_scales == pytest.approx(expected, rel=1e-5)
    log = read_log(out)
    assert [r["step"] for r in log] == [2, 4]
    assert all(0 < r["mse_stage_0"] < 10 and "mse_generating_stage_0" in r for r in log)
    assert (out / "loss_curve.png").is_file()


# ------------------------------------------------------------------------------------------------ bad input


def _fails_before_training(tmp_path, args, error, match):
    out = tmp_path / "out"
    base = ["--output_dir", str(out), "--model_kwargs", TINY, "--report_to", "none", "--max_train_steps", "1"]
    with pytest.raises(error, match=match):
        _script_module().main(base + [str(a) for a in args])
    assert not out.exists(), "nothing may be written before the settings and the data are checked"


def test_unknown_model_name_fails_first(tmp_path):
    # the data folder does not exist either: the model name is checked before any data is loaded
    _fails_before_training(
        tmp_path, ["--model", "DiT-Q/3", "--data_dir", tmp_path / "missing"], ValueError,
        r"model: unknown model 'DiT-Q/3'; known models: .*DFM-DiT-T/4",
    )


@needs_fm
@pytest.mark.parametrize(
    "args, match",
    [
        (["--model", "DFM-DiT-T/4", "--resolution", 30], "resolution: 30 must be divisible by 4"),
        (["--model", "DFM-DiT-T/8", "--resolution", 28], "resolution: 28 must be divisible by 8"),
        (["--model", "DFM-DiT-T/4", "--num_stages", 4], "num_stages: 4 stages .* coarsest stage's patch size would be fractional"),
        (["--model", "DFM-DiT-T/4", "--stage_factors", "[2, 2]"], "stage_factors: must hold num_stages - 1 = 1"),
        (["--model", "DiT-T/4", "--steps_per_stage", "[3, 2]"], "steps_per_stage: must hold num_stages = 1"),
        (["--model", "DFM-DiT-T/4", "--stage_weights", "[0.5, 0.3, 0.2]"], "stage_weights: must hold num_stages = 2"),
    ],
    ids=["resolution-vs-patch", "resolution-vs-patch8", "too-many-stages", "factors", "steps-per-stage", "weights"],
)
def test_stage_settings_that_do_not_fit(tmp_path, args, match):
    _fails_before_training(tmp_path, args + ["--max_samples", 8], ValueError, match)


def _write_idx(path, array):
    import gzip

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_empty_or_unreadable_dataset(tmp_path):
    import numpy as np

    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    _fails_before_training(tmp_path, ["--dataset", empty_folder], ValueError, "is empty")

    no_images = tmp_path / "fm-empty"  # valid Fashion-MNIST IDX files holding 0 images
    no_images.mkdir()
    _write_idx(no_images / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    _write_idx(no_images / "train-labels-idx1-ubyte.gz", np.zeros((0,)))
    _fails_before_training(tmp_path, ["--data_dir", no_images], ValueError, "has no examples")

    corrupt_idx = tmp_path / "fm-corrupt"
    corrupt_idx.mkdir()
    (corrupt_idx / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    _write_idx(corrupt_idx / "train-labels-idx1-ubyte.gz", np.zeros((3,)))
    _fails_before_training(tmp_path, ["--data_dir", corrupt_idx], ValueError, "could not read IDX file")

    bad_images = tmp_path / "bad-images"  # an image folder whose files are not images
    for label in ("cat", "dog"):
        (bad_images / label).mkdir(parents=True)
        (bad_images / label / "0.png").write_bytes(b"this is not a PNG")
    _fails_before_training(tmp_path, ["--dataset", bad_images], ValueError, r"unusable .*cat/0\.png: not an image")

    _fails_before_training(tmp_path, ["--data_dir", tmp_path / "missing"], FileNotFoundError, "apt-get install")


def test_float_settings_accept_exponents_without_a_dot():
    from dfm_diffusers.training.config import load_config
    from dfm_diffusers.training.dit import DiTTrainingConfig

    config = load_config(DiTTrainingConfig, None, ["--learning_rate", "1e-3", "--adam_epsilon=1E-6", "--logit_mean", "0"])
    assert config.learning_rate == 1e-3 and config.adam_epsilon == 1e-6 and config.logit_mean == 0
    assert isinstance(config.learning_rate, float)
    with pytest.raises(ValueError, match="learning_rate: must be a number, got 'fast'"):
        load_config(DiTTrainingConfig, None, ["--learning_rate", "fast"])
