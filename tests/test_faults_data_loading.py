"""Fault injection for issue 8, parts 3 (bad data) and 6 (loading and calling): every injected fault has one
documented outcome, asserted here.

Data: unreadable images (zero-byte, truncated JPEG/PNG, a text file named .png, a metadata.jsonl row whose file is
missing) are skipped, counted and named; more than ``max_bad_sample_fraction`` of them is one ValueError naming
them; an image that breaks after the check is replaced by the next readable index (the same in every process, so
resumed runs are exact); 16-bit PNGs train as their 8-bit equivalents; images without a metadata.jsonl row and
empty/null captions are counted and reported (empty captions kept as "" only with ``allow_empty_captions``).
Loading: a wrong pipeline class, a config.json that does not match its weights, a missing or truncated weight file
are one ValueError at load time naming the folder/file. Calling: bad sizes, guidance scales, class labels and
non-finite latents are ValueErrors. Reproducibility: two FLUX runs with the same seed give the same weights.
"""

import json
import logging
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMPipeline, DFMScheduler
from dfm_diffusers.data import build_captioned_image_dataset, build_image_dataset, preprocess_image
from dfm_diffusers.training.loop import SeededSamples

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level train_dfm_flux.py

pytestmark = pytest.mark.faults

R = 16


def rgb_image(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def break_png_data(path: Path) -> None:
    """Garble the compressed pixel data of a PNG but keep every chunk's CRC valid: PIL's verify() (the check at
    build time) passes, decoding fails. Simulates a file that breaks in a way only a full decode sees."""
    data = bytearray(path.read_bytes())
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = bytes(data[pos + 4 : pos + 8])
        if kind == b"IDAT":
            start = pos + 8
            data[start + 2 : start + length] = bytes(np.random.default_rng(0).integers(0, 256, length - 2, np.uint8))
            crc = zlib.crc32(bytes(data[pos + 4 : start + length])) & 0xFFFFFFFF
            data[start + length : start + length + 4] = struct.pack(">I", crc)
            break
        pos += 12 + length
    path.write_bytes(bytes(data))


@pytest.fixture
def class_folder(tmp_path):
    """Two class subfolders, 8 good images, plus a zero-byte PNG, a truncated JPEG, a truncated PNG and a text file
    named .png (12 candidates, 4 bad)."""
    root = tmp_path / "classes"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            rgb_image(10 * ord(c) + i).save(root / c / f"{i}.png")
    (root / "a" / "zero.png").write_bytes(b"")
    rgb_image(1).save(root / "a" / "cut.jpg", quality=90)
    truncate(root / "a" / "cut.jpg")
    rgb_image(2).save(root / "b" / "cut.png")
    truncate(root / "b" / "cut.png")
    (root / "b" / "notes.png").write_text("not an image")
    return root


BAD_CLASS_FILES = {"a/zero.png": "empty file", "a/cut.jpg": "truncated", "b/cut.png": "truncated",
                   "b/notes.png": "not an image"}


# ------------------------------------------------------------------------------------------------ bad data


def test_unreadable_images_are_skipped_counted_and_named(class_folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_image_dataset(class_folder, R, random_flip=False, max_bad_fraction=0.5)
    assert len(ds) == 8 and ds.bad_samples.total == 12 and ds.bad_samples.num_skipped == 4
    skipped = {os.path.relpath(e.name, class_folder): e.reason for e in ds.bad_samples.skipped}
    assert set(skipped) == set(BAD_CLASS_FILES)
    for name, reason in BAD_CLASS_FILES.items():
        assert reason in skipped[name].lower(), (name, skipped[name])
        assert any(str(class_folder / name) in r.getMessage() for r in caplog.records), name
    # the good images are all there, in order, with their labels, and decode as the originals do
    for i in range(len(ds)):
        path = ds.sample_name(i)
        expected = preprocess_image(Image.open(path), R, ds.channels)
        torch.testing.assert_close(ds[i]["pixel_values"], expected, rtol=0, atol=1e-6)
        assert int(ds[i]["class_labels"]) == ("/b/" in path)
    assert "4 of 12 samples skipped" in ds.bad_samples.summary()


def test_too_many_bad_files_is_one_clear_error(class_folder):
    with pytest.raises(ValueError, match=r"max_bad_sample_fraction") as err:
        build_image_dataset(class_folder, R, max_bad_fraction=0.2)
    message = str(err.value)  # one error naming every bad file, not just the first found
    assert "4 of 12 samples" in message and all(str(class_folder / name) in message for name in BAD_CLASS_FILES)


def test_image_breaking_after_the_check_is_replaced_deterministically(class_folder, caplog):
    for name in BAD_CLASS_FILES:
        os.remove(class_folder / name)
    ds = build_image_dataset(class_folder, R, random_flip=False, max_bad_fraction=0.3)
    assert len(ds) == 8 and ds.bad_samples.num_skipped == 0
    before = [ds[i] for i in range(8)]
    broken = Path(ds.sample_name(2))
    break_png_data(broken)
    assert build_image_dataset(class_folder, R, max_bad_fraction=0.3).bad_samples.num_skipped == 0  # passes the check
    with caplog.at_level(logging.WARNING):
        item = ds[2]
    # sample 2 is replaced by sample 3, label included; it is counted, by name, once, and nothing else changes
    assert torch.equal(item["pixel_values"], before[3]["pixel_values"])
    assert int(item["class_labels"]) == int(before[3]["class_labels"])
    assert ds.bad_samples.num_skipped == 1 and str(broken) in caplog.text
    after = [ds[i] for i in range(8)]
    assert ds.bad_samples.num_skipped == 1
    assert all(torch.equal(after[i]["pixel_values"], before[i]["pixel_values"]) for i in range(8) if i != 2)
    # with random flips: a fresh data set (a resumed run, a DataLoader worker) that has not seen the failure yet
    # gives exactly the samples of one that has, under the training loop's per-sample seeding
    seen = SeededSamples(build_image_dataset(class_folder, R, random_flip=True, max_bad_fraction=0.3), seed=3)
    first = [seen[i]["pixel_values"] for i in range(8)]
    fresh = SeededSamples(build_image_dataset(class_folder, R, random_flip=True, max_bad_fraction=0.3), seed=3)
    assert all(torch.equal(fresh[i]["pixel_values"], first[i]) for i in reversed(range(8)))
    assert all(torch.equal(seen[i]["pixel_values"], first[i]) for i in range(8))
    # more breakage than allowed stops the run with the clear message
    for i in (4, 5):
        break_png_data(Path(ds.sample_name(i)))
    with pytest.raises(ValueError, match="max_bad_sample_fraction"):
        [ds[i] for i in range(8)]


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_matches_its_8_bit_equivalent(tmp_path, channels):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (20, 28), dtype=np.uint8)
    gray16 = gray8.astype(np.uint16) * 257  # the same image in 16 bits (255 -> 65535)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    loaded = Image.open(tmp_path / "g16.png")
    assert loaded.mode in ("I;16", "I")
    reference = preprocess_image(Image.fromarray(gray8), R, channels)
    variants = [loaded, Image.fromarray(gray16.astype(">u2")), Image.fromarray(gray16.astype(np.int32))]
    assert [v.mode for v in variants[1:]] == ["I;16B", "I"]
    for image in variants:
        torch.testing.assert_close(preprocess_image(image, R, channels), reference, rtol=0, atol=1e-6)
    assert abs(reference.mean().item()) < 0.1  # mid-grey on average, not the 97% white of clipping at 255
    # and through a data set (imagefolder) too
    (tmp_path / "folder" / "x").mkdir(parents=True)
    shutil.copy(tmp_path / "g16.png", tmp_path / "folder" / "x" / "g16.png")
    ds = build_image_dataset(tmp_path / "folder", R, random_flip=False, channels=channels)
    torch.testing.assert_close(ds[0]["pixel_values"], reference, rtol=0, atol=1e-6)


@pytest.fixture
def caption_folder(tmp_path):
    """metadata.jsonl layout with: 4 good rows, an empty and a null caption, a row naming a missing file, a
    zero-byte image, a truncated PNG, and an image with no row (10 candidates)."""
    root = tmp_path / "captions"
    root.mkdir()
    rows = []
    for i in range(4):
        rgb_image(i).save(root / f"good{i}.png")
        rows.append({"file_name": f"good{i}.png", "text": f"caption {i}"})
    rgb_image(5).save(root / "empty.png")
    rows.append({"file_name": "empty.png", "text": ""})
    rgb_image(6).save(root / "null.png")
    rows.append({"file_name": "null.png", "text": None})
    rows.append({"file_name": "missing.png", "text": "gone"})
    (root / "zero.png").write_bytes(b"")
    rows.append({"file_name": "zero.png", "text": "zero"})
    rgb_image(7).save(root / "cut.png")
    truncate(root / "cut.png")
    rows.append({"file_name": "cut.png", "text": "cut"})
    rgb_image(8).save(root / "norow.png")
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


@pytest.mark.parametrize("allow_empty", [False, True])
def test_captioned_folder_faults_are_counted_and_reported(caption_folder, caplog, allow_empty):
    with caplog.at_level(logging.WARNING):
        ds = build_captioned_image_dataset(caption_folder, R, max_bad_fraction=0.7, allow_empty_captions=allow_empty)
    log = ds.bad_samples
    reasons = {os.path.basename(e.name): (e.reason, e.kept) for e in log.entries}
    expected = {"missing.png": "file not found", "zero.png": "empty file", "cut.png": "unreadable",
                "norow.png": "no metadata.jsonl row", "empty.png": "empty caption", "null.png": "null caption"}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name][0] and str(caption_folder / name) in caplog.text
        assert reasons[name][1] == (allow_empty and name in ("empty.png", "null.png"))
    captions = sorted(ds[i]["captions"] for i in range(len(ds)))
    if allow_empty:
        assert captions == ["", "", "caption 0", "caption 1", "caption 2", "caption 3"] and log.num_skipped == 4
    else:
        assert captions == ["caption 0", "caption 1", "caption 2", "caption 3"] and log.num_skipped == 6
    assert log.total == 10 and f"{log.num_skipped} of 10 samples skipped" in log.summary()
    with pytest.raises(ValueError, match="max_bad_sample_fraction"):
        build_captioned_image_dataset(caption_folder, R, allow_empty_captions=allow_empty)


def test_dit_trainer_skips_reports_and_resumes_past_bad_files(class_folder, tmp_path, capsys):
    from dfm_diffusers.training.dit import DiTTrainingConfig, train_dit
    from safetensors.torch import load_file

    break_png_data(class_folder / "a" / "1.png")  # passes the check, fails to decode during training

    def run(out, steps, **kw):
        config = DiTTrainingConfig(
            output_dir=str(out), dataset=str(class_folder), resolution=R, model="DFM-DiT-T/4",
            model_kwargs=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16), train_batch_size=4,
            max_train_steps=steps, max_bad_sample_fraction=0.45, report_to="none", validation_steps=0,
            checkpointing_steps=2, steps_per_stage=[1, 1], sample_class_labels=[0], log_every=1, **kw,
        )
        return train_dit(config)

    whole = run(tmp_path / "whole", 4)
    printed = capsys.readouterr().out
    # the 4 found at build time plus the one found while training, each named
    assert "bad samples:" in printed and "5 of 12 samples skipped" in printed
    assert all(str(class_folder / name) in whole["bad_samples"] for name in [*BAD_CLASS_FILES, "a/1.png"])
    assert whole["global_step"] == 4
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume_from_checkpoint="latest", dataloader_num_workers=1)
    assert resumed["global_step"] == 4
    a = load_file(tmp_path / "whole" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_bad_sample_fraction"):  # the default model: fails before building it
        train_dit(DiTTrainingConfig(output_dir=str(tmp_path / "strict"), dataset=str(class_folder), resolution=R,
                                    report_to="none"))
    assert not (tmp_path / "strict" / "training_log.jsonl").exists()


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def dfm_dir(flux_pipeline_dir, tmp_path_factory):
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("dfm")
    DFMPipeline.from_flux_pipeline(FluxPipeline.from_pretrained(flux_pipeline_dir), steps_per_stage=[1, 1]).save_pretrained(path)
    return path


def make_dit_pipe(seed=0):
    torch.manual_seed(seed)
    model = DFMDiTTransformer2DModel.from_preset(
        "DiT-T/4", in_channels=1, sample_size=16, num_stages=2, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, num_classes=5,
    ).eval()
    pipe = DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2, steps_per_stage=[1, 1]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit")
    make_dit_pipe().save_pretrained(path)
    return path


def test_wrong_pipeline_class_is_one_clear_error(flux_pipeline_dir, dfm_dir, dit_dir):
    with pytest.raises(ValueError, match=r"holds a FluxPipeline, not a DFMPipeline.*python -m dfm_diffusers\.convert"):
        DFMPipeline.from_pretrained(flux_pipeline_dir)
    with pytest.raises(ValueError, match=r"holds a FluxPipeline.*DFMDiTPipeline"):
        DFMDiTPipeline.from_pretrained(flux_pipeline_dir)
    with pytest.raises(ValueError, match=r"holds a DFMPipeline, not a DFMDiTPipeline: load it with DFMPipeline"):
        DFMDiTPipeline.from_pretrained(dfm_dir)
    with pytest.raises(ValueError, match=r"holds a DFMDiTPipeline, not a DFMPipeline: load it with DFMDiTPipeline"):
        DFMPipeline.from_pretrained(dit_dir)
    with pytest.raises(ValueError, match="no model_index.json"):
        DFMPipeline.from_pretrained(dfm_dir / "transformer")
    assert isinstance(DFMPipeline.from_pretrained(dfm_dir), DFMPipeline)  # the good folder still loads
    assert isinstance(DFMDiTPipeline.from_pretrained(dit_dir), DFMDiTPipeline)


def edited_copy(src: Path, dst: Path, component: str, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / component / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "which, changes, match",
    [
        ("dfm", dict(num_layers=2), "missing e.g."),  # the weights lack a block the config asks for
        ("dfm", dict(attention_head_dim=8), "context_embedder"),  # differently shaped weights
        ("dit", dict(num_layers=1), "unexpected e.g."),  # the weights hold a block the config does not
        ("dit", dict(num_classes=7), "class_embedder"),
    ],
)
def test_config_that_does_not_match_its_weights(which, changes, match, dfm_dir, dit_dir, tmp_path):
    cls, src = (DFMPipeline, dfm_dir) if which == "dfm" else (DFMDiTPipeline, dit_dir)
    folder = edited_copy(src, tmp_path / "edited", "transformer", **changes)
    with pytest.raises(ValueError, match="config.json does not match") as err:
        cls.from_pretrained(folder)
    assert match in str(err.value) and str(folder / "transformer") in str(err.value)


@pytest.mark.parametrize("which, component", [("dfm", "transformer"), ("dfm", "text_encoder_2"), ("dfm", "vae"),
                                              ("dit", "transformer")])
@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_missing_or_truncated_weight_file(which, component, fault, dfm_dir, dit_dir, tmp_path):
    cls, src = (DFMPipeline, dfm_dir) if which == "dfm" else (DFMDiTPipeline, dit_dir)
    folder = tmp_path / "copy"
    shutil.copytree(src, folder)
    (weights,) = (folder / component).glob("*.safetensors")
    if fault == "missing":
        weights.unlink()
        match = rf"{folder / component} has a config.json but no weight file"
    else:
        truncate(weights)
        match = rf"{weights}: .*(truncated|not a readable safetensors)"
    with pytest.raises(ValueError, match=match):
        cls.from_pretrained(folder)
    if which == "dit" and fault == "missing":  # a component passed in is not read from the folder
        pipe = cls.from_pretrained(folder, transformer=make_dit_pipe().transformer)
        assert isinstance(pipe, DFMDiTPipeline)


# ------------------------------------------------------------------------------------------------ calling


@pytest.fixture(scope="module")
def dfm_pipe(dfm_dir):
    pipe = DFMPipeline.from_pretrained(dfm_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_latents(pipe, height=16, width=16):
    """Per-stage initial noise in the layout the pipeline expects (stage 0 carried at full latent resolution)."""
    shapes = pipe.decomposition.stage_shapes(height, width)
    return [torch.randn(1, 4, h, w) for h, w in shapes]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=0), "height must be a positive int"),
        (dict(width=-32), "width must be a positive int"),
        (dict(height=32.0), "height must be a positive int"),
        (dict(height=2), "must be at least 4"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(true_cfg_scale=float("inf")), "true_cfg_scale must be a finite number >= 0"),
        (dict(latents="nan"), r"latents\[1\] \(stage 1\) holds NaN or inf"),
        (dict(latents="inf"), r"latents\[0\] \(stage 0\) holds NaN or inf"),
    ],
)
def test_dfm_pipeline_rejects_bad_inputs(dfm_pipe, kwargs, match):
    call = dict(prompt="a cat", height=32, width=32, max_sequence_length=8, output_type="latent")
    if kwargs.get("latents") in ("nan", "inf"):
        latents = stage_latents(dfm_pipe)
        latents[1 if kwargs["latents"] == "nan" else 0][0, 0, 0, 0] = float(kwargs["latents"])
        kwargs = dict(latents=latents)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dfm_pipe(**call)


def test_dfm_pipeline_still_runs_with_good_inputs(dfm_pipe):
    out = dfm_pipe("a cat", height=32, width=32, max_sequence_length=8, output_type="latent",
                   latents=stage_latents(dfm_pipe), guidance_scale=0.0)
    assert out.images.shape == (1, 64, 16) and torch.isfinite(out.images).all()  # packed as FluxPipeline does


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[1.5]), "class_labels must be integers"),
        (dict(class_labels=torch.tensor([1.0])), "class_labels must be integers"),
        (dict(class_labels=[True]), "class_labels must be integers"),
        (dict(class_labels="3"), "class_labels must be integers"),
        (dict(class_labels=[5]), r"class_labels must be in 0\.\.4"),
        (dict(class_labels=[-1]), r"class_labels must be in 0\.\.4"),
        (dict(class_labels=[0], guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(class_labels=[0], guidance_scale=-2.0), "guidance_scale must be a finite number"),
        (dict(class_labels=[0], latents="nan"), r"latents\[0\] \(stage 0\) holds NaN"),
    ],
)
def test_dit_pipeline_rejects_bad_inputs(kwargs, match):
    pipe = make_dit_pipe()
    if kwargs.get("latents") == "nan":
        kwargs["latents"] = [torch.full((1, 1, 8, 8), float("nan")), torch.randn(1, 1, 16, 16)]
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, output_type="pt")


def test_dit_pipeline_still_takes_integer_labels_of_any_kind():
    pipe = make_dit_pipe()
    reference = pipe(class_labels=[4, 0], generator=torch.Generator().manual_seed(0), output_type="pt").images
    for labels in (np.array([4, 0]), torch.tensor([4, 0], dtype=torch.int32), (np.int64(4), 0)):
        out = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert pipe(class_labels=3, output_type="pt").images.shape == (1, 1, 16, 16)


# ------------------------------------------------------------------------------------------------ reproducibility


def test_two_flux_runs_with_the_same_seed_give_the_same_weights(flux_pipeline_dir, caption_folder, tmp_path, capsys):
    """The conversion initialises the new stage layers from the global RNG: seeded first, two runs (in one process,
    the RNG state in between being whatever the first left) export identical weights, bad files included."""
    import train_dfm_flux
    from safetensors.torch import load_file

    from dfm_diffusers.pipelines.lora_export import LORA_WEIGHT_NAME, TRAINED_WEIGHT_NAME

    def run(out, seed):
        argv = dict(pretrained=flux_pipeline_dir, dataset=caption_folder, output_dir=out, resolution=R * 2,
                    train_batch_size=2, max_train_steps=1, max_sequence_length=8, report_to="none",
                    checkpointing_steps=0, validation_steps=0, steps_per_stage="[1, 1]", lora_rank=2, seed=seed,
                    max_bad_sample_fraction=0.5, allow_empty_captions="true")
        result = train_dfm_flux.main([x for k, v in argv.items() for x in (f"--{k}", str(v))])
        export = Path(result["export_dir"])  # a LoRA export: the stage layers and the LoRA
        return result, {**load_file(export / TRAINED_WEIGHT_NAME), **load_file(export / LORA_WEIGHT_NAME)}

    first, a = run(tmp_path / "a", 0)
    torch.rand(7)  # whatever else happens in between must not matter
    _, b = run(tmp_path / "b", 0)
    _, c = run(tmp_path / "c", 1)
    stage_keys = [k for k in a if k.startswith("stage_layers.") and a[k].abs().sum() > 0]
    assert stage_keys
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    assert any(not torch.allclose(a[k], c[k]) for k in stage_keys)  # the seed does reach these weights
    assert "4 of 10 samples skipped, 2 kept with a warning" in first["bad_samples"]
    assert "bad samples:" in capsys.readouterr().out
