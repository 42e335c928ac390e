"""Self-contained pipeline folders: loadable by plain diffusers (trust_remote_code=True) without dfm_diffusers, and by
the library with its own classes; push_to_hub's model card pins the uploaded revision."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMPipeline, DFMScheduler, DFMTransformer2DModel

from conftest import RELOAD_ATOL, assert_images_close_after_reload, assert_reloaded_equal

FLUX_CALL = dict(prompt="a cat", height=32, width=32)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dfm_pipe(tokenizer_dir):
    from conftest import make_tiny_flux_components

    pipe = DFMPipeline.from_flux_pipeline(FluxPipeline(**make_tiny_flux_components(tokenizer_dir)), num_stages=2,
                                          steps_per_stage=[2, 2], stage_thresholds=[0.3])
    torch.manual_seed(1)
    with torch.no_grad():  # stage 1 does something
        for p in pipe.transformer.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit_pipe():
    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset("DiT-T/4", in_channels=1, sample_size=16, num_stages=2, num_layers=1,
                                                 num_attention_heads=2, attention_head_dim=16, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    pipe = DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2, steps_per_stage=[2, 2]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(dfm_pipe, dit_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("self-contained")
    dfm_pipe.save_pretrained(root / "flux", self_contained=True)
    dit_pipe.save_pretrained(root / "dit", self_contained=True)
    return root


def test_folder_layout(saved):
    index = json.loads((saved / "flux" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dfm", "DFMPipeline"]
    assert index["transformer"] == ["transformer_dfm_flux", "DFMTransformer2DModel"]
    assert index["scheduler"] == ["scheduling_dfm", "DFMScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    config = json.loads((saved / "flux" / "transformer" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "transformer_dfm_flux.DFMTransformer2DModel"}
    for entry in ["pipeline_dfm.py", "transformer/transformer_dfm_flux.py", "scheduler/scheduling_dfm.py"]:
        assert (saved / "flux" / entry).is_file(), entry
    dit_index = json.loads((saved / "dit" / "model_index.json").read_text())
    assert dit_index["_class_name"] == ["pipeline_dfm_dit", "DFMDiTPipeline"]
    assert dit_index["transformer"] == ["transformer_dfm_dit", "DFMDiTTransformer2DModel"]
    # the copied code imports nothing of dfm_diffusers (every intra-package import made flat) and compiles
    for path in list((saved / "flux").rglob("*.py")) + list((saved / "dit").rglob("*.py")):
        source = path.read_text()
        compile(source, str(path), "exec")
        assert "dfm_diffusers." not in "".join(line for line in source.splitlines(True)
                                                if line.lstrip().startswith(("from ", "import "))), path
    # the library's training code is not dragged along
    assert not any("training" in p.name or "evaluation" in p.name for p in (saved / "flux").rglob("*.py"))


def test_library_loads_the_folder_with_its_own_classes(dfm_pipe, saved, caplog):
    loaded = DFMPipeline.from_pretrained(saved / "flux")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is DFMTransformer2DModel and type(loaded.scheduler) is DFMScheduler
    assert "auto_map" not in caplog.text  # not a config attribute: dropped without a warning
    assert_reloaded_equal(dfm_pipe, loaded)
    assert_images_close_after_reload(dfm_pipe(generator=gen(), output_type="pt", **FLUX_CALL).images,
                                     loaded(generator=gen(), output_type="pt", **FLUX_CALL).images)
    model = DFMTransformer2DModel.from_pretrained(saved / "flux" / "transformer")
    assert type(model) is DFMTransformer2DModel


def test_plain_diffusers_loads_it_without_dfm_diffusers(dfm_pipe, dit_pipe, saved, tmp_path):
    """The acceptance test: in a process where dfm_diffusers cannot be imported, DiffusionPipeline.from_pretrained(
    folder, trust_remote_code=True) (a folder, and a Hub repo id at a pinned revision) gives DFMPipeline's images."""
    spec = {"flux": str(saved / "flux"), "dit": str(saved / "dit"), "hub_commit": "0123456789abcdef" * 2 + "01234567",
            "resaved": str(tmp_path / "resaved"), "out": str(tmp_path / "out.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    driver = Path(__file__).with_name("remote_code_driver.py")
    done = subprocess.run([sys.executable, str(driver), str(tmp_path / "spec.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = torch.load(spec["out"])
    classes = out["classes"]
    assert not classes["dfm_diffusers_imported"]
    assert all(module.startswith("diffusers_modules.") for module in classes["flux"] + classes["dit"])
    assert classes["automodel_is_pipeline_class"] and bool(out["automodel_weights_equal"])
    reference = dfm_pipe(generator=gen(), output_type="pt", **FLUX_CALL).images
    for name in ("flux", "hub", "resaved"):
        torch.testing.assert_close(out[name], reference, rtol=0, atol=RELOAD_ATOL)
    dit_reference = dit_pipe(class_labels=[1, 2], generator=gen(), output_type="pt").images
    torch.testing.assert_close(out["dit"], dit_reference, rtol=0, atol=RELOAD_ATOL)
    assert "Expected types for" not in done.stderr  # the pipeline and its components share their classes


def test_push_to_hub_uploads_code_and_pins_the_revision_in_the_card(dfm_pipe, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    class Repo:
        repo_id = "someone/tiny-dfm"

    class Commit:
        oid = "f" * 40
        pr_revision = None

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs)
        calls.append(("folder", files, open(os.path.join(folder_path, "README.md")).read()))
        return Commit()

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        calls.append(("file", path_in_repo, open(path_or_fileobj).read()))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    dfm_pipe.push_to_hub("tiny-dfm", base_model="black-forest-labs/FLUX.1-dev",
                         sampling={"true_cfg_scale": 3.0, "guidance_scale": 1.0})
    (_, files, first_card), (_, readme, card) = calls
    assert {"pipeline_dfm.py", "transformer/transformer_dfm_flux.py", "scheduler/scheduling_dfm.py"} <= set(files)
    assert readme == "README.md" and 'revision="' not in first_card
    assert 'DFMPipeline.from_pretrained("someone/tiny-dfm", dtype=torch.bfloat16)' in card
    assert (f'DiffusionPipeline.from_pretrained("someone/tiny-dfm", revision="{"f" * 40}", trust_remote_code=True, '
            f'dtype=torch.bfloat16)') in card
    assert card.count("true_cfg_scale=3.0, guidance_scale=1.0") == 2 and "torch_dtype" not in card
    calls.clear()
    dfm_pipe.push_to_hub("tiny-dfm", self_contained=False)
    assert "pipeline_dfm.py" not in calls[0][1] and "trust_remote_code" not in calls[1][2]


def test_convert_command_self_contained(flux_pipeline_dir, tmp_path):
    from dfm_diffusers.convert import main

    main(["--flux", str(flux_pipeline_dir), "--output", str(tmp_path / "dfm"), "--steps-per-stage", "2", "2",
          "--torch-dtype", "float32", "--self-contained"])
    index = json.loads((tmp_path / "dfm" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dfm", "DFMPipeline"] and (tmp_path / "dfm" / "pipeline_dfm.py").is_file()
    assert DFMPipeline.from_pretrained(tmp_path / "dfm").scheduler.config.steps_per_stage == [2, 2]
