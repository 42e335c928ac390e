"""Fault injection for the shared training loop (issue 8, parts 2 and 4), in-process on tiny CPU models.

Non-finite losses and weights, a second run on a held output folder, stale locks, corrupted or truncated
checkpoints, crafted pickles, a disk that fills during a save, deletions and log rewrites killed half-way.
"""

import errno
import json
import logging
import os
import pickle
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dfm_diffusers.training import checkpointing
from dfm_diffusers.training.checkpointing import (
    LOCK_FILE,
    CheckpointError,
    CheckpointSaveError,
    NonFiniteLossError,
    NonFiniteTrainingError,
    OutputDirLock,
    OutputDirLockedError,
    list_checkpoints,
    remove_checkpoint,
    rotate_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from dfm_diffusers.training.loop import LoopConfig, TrainingLog, run_training

pytestmark = pytest.mark.faults


class Regression(torch.utils.data.Dataset):
    """32 samples of y = x @ w; ``poisoned`` indices get inf inputs (what an image with inf pixels gives)."""

    def __init__(self, poisoned=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g)
        self.poisoned = set(poisoned)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = torch.full_like(self.x[i], float("inf")) if i in self.poisoned else self.x[i]
        return {"x": x, "y": self.y[i], "poisoned": i in self.poisoned}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def mse(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).mean(), {}


def config(out, **kwargs):
    base = dict(output_dir=str(out), max_train_steps=8, train_batch_size=8, learning_rate=1e-2, checkpointing_steps=2,
                checkpoints_total_limit=None, validation_steps=0, report_to=None, ema_decay=0.9, log_every=1,
                max_consecutive_nonfinite_steps=3)
    base.update(kwargs)
    return LoopConfig(**base)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    return {**load_file(Path(folder) / "model.safetensors"),
            **{f"ema.{k}": v for k, v in load_file(Path(folder) / "ema.safetensors").items()}}


# ------------------------------------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("accumulation,fused", [(1, False), (2, False), (1, True), (2, True)])
def test_a_step_with_a_non_finite_loss_is_skipped_and_counted(tmp_path, accumulation, fused):
    """One inf sample: the (accumulated) step holding it is skipped - no optimizer, lr or EMA update, gradients
    dropped - logged with the counter, and training goes on; everything saved stays finite. With the fused AdamW
    the update is dropped on the device (found_inf) and the verdict read afterwards (nonfinite_check deferred)."""
    poisoned_steps, micro = [], []

    def loss_fn(model, batch):
        micro.append(bool(batch["poisoned"].any()))
        if len(micro) % accumulation == 0:
            if any(micro[-accumulation:]):
                poisoned_steps.append(len(micro) // accumulation)
        return mse(model, batch)

    steps = 8
    cfg = config(tmp_path, max_train_steps=steps, gradient_accumulation_steps=accumulation,
                 train_batch_size=8 // accumulation, lr_scheduler="linear", checkpointing_steps=steps, adam_fused=fused)
    model = make_model()
    result = run_training(cfg, model, Regression(poisoned=[5]), loss_fn)

    # one poisoned sample per epoch of 4 steps: two skipped steps (fewer than 3 in a row: the run finishes), and
    # a good step right after one
    assert len(poisoned_steps) == 2 and any(s + 1 not in poisoned_steps for s in poisoned_steps)
    assert result["global_step"] == steps and result["nonfinite_steps"] == 2
    rows = {r["step"]: r for r in result["log"]}
    for step in poisoned_steps:  # (the logged loss is the last micro-batch's: finite if the inf was in another)
        assert not torch.isfinite(torch.tensor(rows[step]["grad_norm"]))
        assert rows[step]["nonfinite_steps"] == poisoned_steps.index(step) + 1
    # every other step has a finite loss and gradient norm: the NaN gradients of a skipped step were dropped,
    # not carried into the next one
    good = [r for s, r in rows.items() if s not in poisoned_steps]
    assert len(good) == steps - 2
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in good)
    assert all(r["nonfinite_steps"] == sum(p < r["step"] for p in poisoned_steps) for r in good)
    assert all_finite(model.parameters())

    ckpt = tmp_path / "checkpoints" / f"checkpoint-{steps}"
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {steps - 2}  # Adam stepped 6 times, not 8
    scheduler = torch.load(ckpt / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == steps - 2  # the lr schedule advanced only on good steps
    with safe_open(ckpt / "ema.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["optimization_step"]) == steps - 2
    assert all_finite(checkpoint_tensors(ckpt).values())


@pytest.mark.parametrize("fused", [False, True])
def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, fused):
    """From step 8 on every loss is NaN: steps 8, 9, 10 are skipped, the third in a row stops the run with an error
    naming step 10; the save due at step 9 is not written (it would rotate out a good one); no export."""
    calls, exported = [], []

    def loss_fn(model, batch):
        calls.append(1)
        loss, logs = mse(model, batch)
        return (loss * float("nan") if len(calls) >= 8 else loss), logs

    cfg = config(tmp_path, max_train_steps=20, checkpointing_steps=3, checkpoints_total_limit=2, adam_fused=fused)
    model = make_model()
    with pytest.raises(NonFiniteLossError, match=r"step 10: 3 consecutive steps with a non-finite loss") as info:
        run_training(cfg, model, Regression(), loss_fn, export_fn=lambda m, folder: exported.append(folder))
    assert "checkpoint-6" in str(info.value)  # says which checkpoint to go back to
    assert not exported and not (tmp_path / "pipeline").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]
    last = tmp_path / "checkpoints" / "checkpoint-6"
    assert verify_checkpoint(last) is None
    saved = load_file(last / "model.safetensors")
    assert all_finite(checkpoint_tensors(last).values())
    # skipped steps changed nothing: the weights at the stop are those of step 7 (not NaN)
    assert all_finite(model.parameters())
    rows = TrainingLog(str(tmp_path / "training_log.jsonl"), True).read()
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["nonfinite_steps"] for r in rows[-3:]] == [1, 2, 3]
    assert not (tmp_path / LOCK_FILE).exists()  # released on the way out

    # resuming from the last good checkpoint replays steps 7.. exactly (the poisoned loss_fn aside)
    cfg.resume_from_checkpoint = "latest"
    cfg.max_train_steps = 7
    resumed = make_model()
    run_training(cfg, resumed, Regression(), mse)
    torch.testing.assert_close(dict(resumed.named_parameters()), dict(model.named_parameters()), rtol=0, atol=0)
    assert set(saved) == {n for n, _ in resumed.named_parameters()}


@pytest.mark.parametrize("checkpointing_steps", [2, 0], ids=["checkpoint", "export"])
def test_weights_holding_nan_are_never_saved_or_exported(tmp_path, checkpointing_steps):
    """A parameter turns NaN with a finite loss and gradient (it gets no gradient): the save (or, without
    checkpoints, the export) refuses with an error; the earlier checkpoint stays."""
    calls = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = make_model(), nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.net(x)

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                model.unused[1] = float("inf")
        return mse(model, batch)

    exported = []
    with pytest.raises(NonFiniteTrainingError, match=r"hold NaN/inf \(first: \['unused'") as info:
        run_training(config(tmp_path, max_train_steps=4, checkpointing_steps=checkpointing_steps), Model(),
                     Regression(), loss_fn, export_fn=lambda m, folder: exported.append(folder))
    assert ("checkpoint of step 4" if checkpointing_steps else "exported pipeline") in str(info.value)
    assert not exported
    expected = [2] if checkpointing_steps else []
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == expected
    assert not list(tmp_path.glob("checkpoints/*.tmp"))  # the refused save wrote nothing


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Fashion-MNIST is not installed")
def test_dit_trainer_with_learning_rate_1e6_stops_instead_of_saving_nan(tmp_path):
    """The reported case: ``--learning_rate 1e6 --max_grad_norm 0`` used to finish with all checkpoints and the
    export 100% NaN. Now it stops with an error naming the step; what it saved is finite; no pipeline."""
    from test_train_dit import TINY, _script_module

    out = tmp_path / "dit"
    args = ["--output_dir", out, "--model", "DFM-DiT-T/4", "--model_kwargs", TINY, "--report_to", "none",
            "--steps_per_stage", "[3, 2]", "--max_samples", 64, "--train_batch_size", 16, "--max_train_steps", 20,
            "--learning_rate", "1e6", "--max_grad_norm", 0, "--log_every", 1, "--checkpointing_steps", 2,
            "--validation_steps", 0]
    with pytest.raises(NonFiniteLossError, match=r"step \d+: 5 consecutive steps"):
        _script_module().main([str(a) for a in args])
    assert not (out / "pipeline").exists()
    rows = TrainingLog(str(out / "training_log.jsonl"), True).read()
    first_skipped = min(r["step"] for r in rows if r["nonfinite_steps"])  # measured: 3 (inf gradient norm)
    assert [r["step"] for r in rows if r["nonfinite_steps"]] == list(range(first_skipped, first_skipped + 5))
    checkpoints = list_checkpoints(out / "checkpoints")
    assert checkpoints and all(step < first_skipped for step, _ in checkpoints)  # none inside the bad run
    for _, folder in checkpoints:
        assert verify_checkpoint(folder) is None and all_finite(checkpoint_tensors(folder).values())


# ------------------------------------------------------------------------------------------- output-folder lock


def _live_lock(path: Path, pid: int, **fields):
    record = {"pid": pid, "host": socket.gethostname(), "boot_id": checkpointing._boot_id(),
              "start_time": checkpointing._start_time(pid), "started_at": "earlier", "token": "theirs"}
    record.update(fields)
    path.write_text(json.dumps(record))


def test_a_second_run_on_a_held_output_dir_refuses_at_once(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])  # stands for the live run that holds the folder
    try:
        _live_lock(tmp_path / LOCK_FILE, holder.pid)
        with pytest.raises(OutputDirLockedError, match=rf"in use by another run \(pid {holder.pid} on"):
            run_training(config(tmp_path), make_model(), Regression(), mse)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "training_log.jsonl").exists()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # left alone
        # a lock from another machine cannot be checked: refused too
        _live_lock(tmp_path / LOCK_FILE, 1, host="elsewhere")
        with pytest.raises(OutputDirLockedError, match="pid 1 on elsewhere"):
            OutputDirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()

    # two lock objects in one process: the second is refused while the first holds, then succeeds
    (tmp_path / LOCK_FILE).unlink()
    first = OutputDirLock(str(tmp_path)).acquire()
    with pytest.raises(OutputDirLockedError):
        OutputDirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputDirLock(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("stale", ["dead-pid", "reused-pid", "rebooted"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, stale):
    if stale == "dead-pid":
        gone = subprocess.Popen(["true"])
        gone.wait()
        _live_lock(tmp_path / LOCK_FILE, gone.pid, start_time=None)
    elif stale == "reused-pid":  # our own pid, but recorded for a process that started at another time
        _live_lock(tmp_path / LOCK_FILE, os.getpid(), start_time=-5)
    else:
        _live_lock(tmp_path / LOCK_FILE, os.getpid(), boot_id="another-boot")
    with caplog.at_level(logging.WARNING, logger="dfm_diffusers.training.checkpointing"):
        result = run_training(config(tmp_path, max_train_steps=2), make_model(), Regression(), mse)
    assert result["global_step"] == 2
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


def test_the_lock_is_released_when_training_fails(tmp_path):
    def broken(model, batch):
        raise RuntimeError("a bug in the loss")

    with pytest.raises(RuntimeError, match="a bug in the loss"):
        run_training(config(tmp_path), make_model(), Regression(), broken)
    assert not (tmp_path / LOCK_FILE).exists()
    assert run_training(config(tmp_path, max_train_steps=1), make_model(), Regression(), mse)["global_step"] == 1


# ------------------------------------------------------------------------------------------- manifests, resume


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4, 6, and the weights of an uninterrupted 8-step run."""
    root = tmp_path_factory.mktemp("six")
    run_training(config(root / "run", max_train_steps=6), make_model(), Regression(), mse)
    full = make_model()
    run_training(config(root / "full", max_train_steps=8), full, Regression(), mse)
    return root / "run", {k: v.detach().clone() for k, v in full.named_parameters()}


def test_checkpoints_hold_no_pickle_and_resume_exactly(six_steps, tmp_path):
    import shutil

    run, full = six_steps
    out = tmp_path / "run"
    shutil.copytree(run, out)
    for _, folder in list_checkpoints(out / "checkpoints"):
        names = sorted(os.listdir(folder))
        assert "ema.safetensors" in names and "manifest.json" in names and "loop_state.json" in names
        assert not [n for n in names if "custom_checkpoint" in n]
        for name in names:  # accelerate's own state files load without unpickling code
            if name.endswith((".pkl", ".bin")):
                accelerate_load(Path(folder) / name)  # torch.load(weights_only=True) + numpy's array types
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        assert set(manifest["files"]) == set(names) - {"manifest.json"}
    resumed = make_model()
    run_training(config(out, max_train_steps=8, resume_from_checkpoint="latest"), resumed, Regression(), mse)
    for name, param in resumed.named_parameters():
        assert torch.equal(param, full[name]), name


def test_latest_skips_corrupted_and_truncated_checkpoints_and_says_so(six_steps, tmp_path, caplog):
    import shutil

    run, full = six_steps
    out = tmp_path / "run"
    shutil.copytree(run, out)
    checkpoints = out / "checkpoints"
    weights = checkpoints / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    ema = checkpoints / "checkpoint-4" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte, same size: only the hash sees it
    ema.write_bytes(bytes(data))

    assert "truncated" in verify_checkpoint(checkpoints / "checkpoint-6", hashes=False)
    assert verify_checkpoint(checkpoints / "checkpoint-4", hashes=False) is None
    with pytest.raises(CheckpointError, match="checkpoint-4 does not verify: ema.safetensors does not match its sha"):
        run_training(config(out, resume_from_checkpoint=str(checkpoints / "checkpoint-4")), make_model(),
                     Regression(), mse)

    with caplog.at_level(logging.WARNING, logger="dfm_diffusers.training.checkpointing"):
        resumed = make_model()
        run_training(config(out, max_train_steps=8, resume_from_checkpoint="latest"), resumed, Regression(), mse)
    skipped = [r.getMessage() for r in caplog.records if "resume: skipped" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and "checkpoint-4" in skipped[1]
    for name, param in resumed.named_parameters():  # resumed from step 2, still exact
        assert torch.equal(param, full[name]), name

    for _, folder in list_checkpoints(checkpoints):  # all damaged ones: refuse rather than start over
        (Path(folder) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        run_training(config(out, resume_from_checkpoint="latest"), make_model(), Regression(), mse)


class _Payload:
    """Unpickling this writes a marker file: it would show a crafted pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_pickle_in_a_checkpoint_never_runs(six_steps, tmp_path):
    import shutil

    run, _ = six_steps
    out = tmp_path / "run"
    shutil.copytree(run, out)
    folder = out / "checkpoints" / "checkpoint-6"
    marker = tmp_path / "pwned"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"files not in the manifest \['custom_checkpoint_0.pkl'\]"):
        run_training(config(out, resume_from_checkpoint=str(folder)), make_model(), Regression(), mse)
    write_manifest(folder, 6)  # the attacker rewrites the manifest too: still nothing is unpickled
    with pytest.raises(RuntimeError):
        run_training(config(out, resume_from_checkpoint=str(folder)), make_model(), Regression(), mse)
    (folder / "custom_checkpoint_0.pkl").unlink()
    (folder / "random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(folder, 6)
    # read with weights_only=True, and an unreadable RNG file fails the resume (accelerate alone would go on)
    with pytest.raises(CheckpointError, match="random_states_0.pkl cannot be read as random states"):
        run_training(config(out, resume_from_checkpoint=str(folder)), make_model(), Regression(), mse)
    assert not marker.exists()


def test_rotation_keeps_the_newest_verified_checkpoints_and_never_counts_broken_ones(tmp_path):
    for step in (2, 4, 6, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * step)
        write_manifest(folder, step)
    (tmp_path / "checkpoint-8" / "model.safetensors").write_bytes(b"x")  # truncated after it was written
    (tmp_path / "checkpoint-6" / "manifest.json").unlink()  # never completed
    rotate_checkpoints(str(tmp_path), 1)
    # the broken 6 and 8 neither count nor get deleted; of the good ones only the newest (4) stays
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------- killed deletes, log, disk full


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no clean-up code runs."""


def test_a_killed_deletion_never_leaves_a_half_deleted_checkpoint_under_a_valid_name(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("a.bin", "b.bin"):
        (folder / name).write_bytes(b"data")
    write_manifest(folder, 4)

    def dying_rmtree(path, ignore_errors=False):
        os.unlink(os.path.join(path, "a.bin"))
        raise Killed()

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):
        remove_checkpoint(str(folder))
    monkeypatch.undo()
    assert not folder.exists() and list_checkpoints(str(tmp_path)) == []
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith("checkpoint-4.deleting")
    checkpointing.remove_leftovers(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_the_training_log_is_rewritten_atomically(tmp_path, monkeypatch):
    log = TrainingLog(str(tmp_path / "log.jsonl"), True)
    for step in range(1, 5):
        log.append({"step": step, "loss": float(step)})
    before = (tmp_path / "log.jsonl").read_text()
    real_dumps, calls = json.dumps, []

    def dying_dumps(obj, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 2:
            raise Killed()
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dying_dumps)
    with pytest.raises(Killed):
        log.truncate_after(2)
    monkeypatch.undo()
    assert (tmp_path / "log.jsonl").read_text() == before  # a kill mid-rewrite leaves the old log whole
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    assert os.listdir(tmp_path) == ["log.jsonl"]


@pytest.mark.parametrize("fault", ["enospc", "torch-save"])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    """The save of step 4 runs out of space after writing part of its files: a clear error, no partial folder,
    checkpoint-2 untouched and a resume from it works. "torch-save" is what torch.save raises on a full disk
    (measured on /dev/full: a RuntimeError without the errno): recognised by the free space left."""
    from accelerate import Accelerator

    real_save, calls = Accelerator.save_state, []
    if fault == "enospc":
        error = OSError(errno.ENOSPC, "No space left on device")
    else:
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        error.__context__ = RuntimeError("basic_ios::clear: iostream error")
        real_usage, partial = checkpointing.shutil.disk_usage, tmp_path / "checkpoints" / "checkpoint-4.tmp"

        def nearly_full(path):  # 10 MiB left while the partial folder exists; removing it gives back 1 MiB
            return real_usage(path)._replace(free=(10 if partial.exists() else 11) * 2**20)

        monkeypatch.setattr(checkpointing.shutil, "disk_usage", nearly_full)

    def full_disk_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            real_save(self, output_dir, **kwargs)
            Path(output_dir, "optimizer.bin").write_bytes(b"half")
            raise error
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk_save)
    with pytest.raises(CheckpointSaveError, match="checkpoint-4 failed: the disk is full") as info:
        run_training(config(tmp_path, max_train_steps=6), make_model(), Regression(), mse)
    assert "checkpoint-2 is untouched" in str(info.value) and "Free some space" in str(info.value)
    if fault == "torch-save":
        assert "10.0 MiB were free when it failed, 11.0 MiB after removing it" in str(info.value)
    assert info.value.__cause__ is error
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2"]  # the partial checkpoint-4.tmp was removed
    assert verify_checkpoint(checkpoints / "checkpoint-2") is None
    assert not (tmp_path / LOCK_FILE).exists()
    result = run_training(config(tmp_path, max_train_steps=6, resume_from_checkpoint="latest"), make_model(),
                          Regression(), mse)
    assert result["global_step"] == 6 and [r["step"] for r in result["log"]] == list(range(1, 7))


def test_another_failed_save_is_reported_as_itself(tmp_path, monkeypatch):
    """A failure with plenty of space left is not called a full disk; the partial folder goes all the same."""
    from accelerate import Accelerator

    def failing_save(self, output_dir=None, **kwargs):
        os.makedirs(output_dir)
        raise PermissionError(errno.EACCES, "Permission denied", output_dir)

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint-2 failed: PermissionError: .*Permission denied") as info:
        run_training(config(tmp_path, max_train_steps=2), make_model(), Regression(), mse)
    assert "disk is full" not in str(info.value) and "no earlier checkpoint exists" in str(info.value)
    assert os.listdir(tmp_path / "checkpoints") == []
