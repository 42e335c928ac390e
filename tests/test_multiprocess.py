"""Two training processes through ``accelerate launch`` (tiny FLUX, the repository's accelerate configs).

CPU: 2 processes, gloo (ACCELERATE_USE_CPU=1), LoRA under DDP (examples/accelerate/ddp_lora.yaml). accelerate runs
FSDP only on accelerators (its CPU path is MULTI_CPU whatever the config says), so the FSDP full-finetune case is a
``gpu`` test that needs 2 GPUs. tests/multiprocess_flux_driver.py records what each rank did.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multiprocess_flux_driver.py"

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(accelerate_config: str, out: Path, cpu: bool, **settings) -> list[dict]:
    """2 processes of the driver; returns the two ranks' records (rank order)."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    args = dict(resolution=32, train_batch_size=1, max_sequence_length=16, report_to="none",
                validation_prompts='["a cat"]', steps_per_stage="[2, 2]", log_every=1, output_dir=out, **settings)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / accelerate_config),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
           str(DRIVER), *[x for k, v in args.items() for x in (f"--{k}", str(v))]]
    if cpu:
        cmd[5:5] = ["--mixed_precision", "no"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["num_processes"] == 2 for r in records)
    return records


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]


def per_epoch(record: dict) -> dict[int, set[int]]:
    seen = {}
    for epoch, index in record["samples"]:
        seen.setdefault(epoch, set()).add(index)
    return seen


def test_two_processes_shard_data_export_once_and_resume_exactly(flux_pipeline_dir, caption_dir, tmp_path):
    settings = dict(pretrained=flux_pipeline_dir, dataset=caption_dir, max_train_steps=4, checkpointing_steps=2,
                    validation_steps=2, lora_rank=4, learning_rate=1e-2, cache_latents="true",
                    cache_dir=tmp_path / "cache")
    first = tmp_path / "run"
    ranks = launch("examples/accelerate/ddp_lora.yaml", first, cpu=True, **settings)
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" and r["global_step"] == 4 for r in ranks)

    # data: 4 images, 1 per rank per step -> 2 steps an epoch; each epoch the ranks load disjoint halves
    epochs = [per_epoch(r) for r in ranks]
    assert set(epochs[0]) == set(epochs[1]) == {0, 1}
    for e in (0, 1):
        assert epochs[0][e].isdisjoint(epochs[1][e]) and epochs[0][e] | epochs[1][e] == {0, 1, 2, 3}
        assert len(epochs[0][e]) == len(epochs[1][e]) == 2
    # the cache: built once, by the main process (the other one found it complete)
    assert ranks[0]["cache_builds"] == [{"images": 4, "captions": 5}] and ranks[1]["cache_builds"] == []
    # validation and export on the main process only; rank 1 saved no image
    assert ranks[0]["sample_fn_steps"] == [2, 4] and ranks[1]["sample_fn_steps"] == []
    assert ranks[0]["export_fn_calls"] == 1 and ranks[1]["export_fn_calls"] == 0
    assert sorted(ranks[0]["images_saved"]) == ["loss_curve.png", "samples/step_0000002.png",
                                                "samples/step_0000004.png"]
    assert ranks[1]["images_saved"] == []
    checkpoint = first / "checkpoints" / "checkpoint-2"
    assert {f"random_states_{r}.pkl" for r in (0, 1)} <= set(os.listdir(checkpoint))
    assert [row["step"] for row in log_rows(first)] == [1, 2, 3, 4]

    # resume from step 2 in a fresh folder: steps 3-4 and the export match the uninterrupted run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-2")
    again = launch("examples/accelerate/ddp_lora.yaml", resumed, cpu=True, resume_from_checkpoint="latest",
                   **settings)
    assert again[0]["cache_builds"] == [] and again[1]["cache_builds"] == []  # the shared cache is reused
    for before, after in zip(ranks, again):  # each rank goes on with the same shard of epoch 1
        assert per_epoch(after) == {1: per_epoch(before)[1]}
    rows, reference = log_rows(resumed), log_rows(first)[2:]
    assert [row["step"] for row in rows] == [3, 4]
    for row, ref in zip(rows, reference):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    changed = 0
    for name in os.listdir(first / "pipeline"):
        if name.endswith(".safetensors"):
            a, b = load_file(first / "pipeline" / name), load_file(resumed / "pipeline" / name)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
            changed += 1
    assert changed == 2  # the LoRA and the stage layers


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_full_finetune_sharded_checkpoint_resume_and_consolidated_export(flux_pipeline_dir, caption_dir,
                                                                               tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dfm_diffusers import DFMPipeline

    settings = dict(pretrained=flux_pipeline_dir, dataset=caption_dir, max_train_steps=4, checkpointing_steps=2,
                    validation_steps=2, lora="false", learning_rate=1e-3, use_8bit_adam="false",
                    mixed_precision="bf16", cache_latents="true", cache_dir=tmp_path / "cache")
    first = tmp_path / "run"
    ranks = launch("examples/accelerate/fsdp_full_finetune.yaml", first, cpu=False, **settings)
    assert all(r["distributed_type"] == "DistributedType.FSDP" for r in ranks)
    # lockstep validation: every rank samples, only the main one writes; the export on the main one
    assert ranks[0]["sample_fn_steps"] == ranks[1]["sample_fn_steps"] == [2, 4]
    assert ranks[1]["images_saved"] == [] and ranks[1]["export_fn_calls"] == 0 and ranks[0]["export_fn_calls"] == 1
    for e in (0, 1):
        assert per_epoch(ranks[0])[e].isdisjoint(per_epoch(ranks[1])[e])
    checkpoint = first / "checkpoints" / "checkpoint-4"
    shards = [p for p in checkpoint.rglob("*.distcp")]
    assert len({p.parent for p in shards}) >= 1 and len(shards) >= 2  # one shard file per rank (model, optimizer)

    # the consolidated export loads on one process and holds the weights of the final sharded checkpoint
    saved = {}
    for f in sorted((first / "pipeline" / "transformer").glob("*.safetensors")):
        saved.update(load_file(f))
    assert torch.bfloat16 in {v.dtype for v in saved.values()}  # the export is in weight_dtype
    pipe = DFMPipeline.from_pretrained(first / "pipeline", torch_dtype=torch.float32)
    exported = pipe.transformer.state_dict()
    model_dir = next(p for p in checkpoint.iterdir() if p.is_dir() and p.name.startswith("pytorch_model_fsdp"))
    dcp_to_torch_save(model_dir, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    full = full.get("model", full)
    full = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in full.items()}
    assert exported.keys() == full.keys()
    for key, value in exported.items():  # rounding the float32 master weights to the saved dtype is deterministic
        torch.testing.assert_close(value, full[key].to(saved[key].dtype).float(), rtol=0, atol=0)
    start = DFMPipeline.from_flux_pipeline(
        __import__("diffusers").FluxPipeline.from_pretrained(flux_pipeline_dir)).transformer.state_dict()
    assert any(not torch.equal(exported[k], start[k].to(exported[k].dtype).float()) for k in start)

    # resume from the sharded checkpoint of step 2: steps 3-4 match
    resumed = tmp_path / "resumed"
    launch("examples/accelerate/fsdp_full_finetune.yaml", resumed, cpu=False,
           resume_from_checkpoint=first / "checkpoints" / "checkpoint-2", **settings)
    rows, reference = log_rows(resumed), log_rows(first)[2:]
    assert [row["step"] for row in rows] == [3, 4]
    for row, ref in zip(rows, reference):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-3)


def test_fsdp_refusals_and_consolidated_model(tiny_flux_transformer):
    """In process: what the loop refuses under FSDP, and the unsharded copy the FSDP export hands to export_fn."""
    from types import SimpleNamespace

    from dfm_diffusers import DFMTransformer2DModel
    from dfm_diffusers.training.loop import LoopConfig, consolidated_model, fsdp_problems

    model = DFMTransformer2DModel.from_flux(tiny_flux_transformer)
    fsdp2 = SimpleNamespace(is_fsdp2=True)
    assert fsdp_problems(fsdp2, model, LoopConfig(use_ema=False)) == []
    problems = " ".join(fsdp_problems(SimpleNamespace(is_fsdp2=False), model, LoopConfig()))
    assert "fsdp_version: 2" in problems and "use_ema" in problems
    assert "use_8bit_adam" in " ".join(fsdp_problems(fsdp2, model, LoopConfig(use_ema=False, use_8bit_adam=True)))
    model.stage_layers.requires_grad_(False)
    assert "ddp_lora.yaml" in " ".join(fsdp_problems(fsdp2, model, LoopConfig(use_ema=False)))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    copy = consolidated_model(model, state)
    assert type(copy) is DFMTransformer2DModel and copy is not model and not copy.training
    assert copy.state_dict().keys() == state.keys()
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        consolidated_model(model, {k: v for k, v in state.items() if not k.startswith("stage_layers.")})
