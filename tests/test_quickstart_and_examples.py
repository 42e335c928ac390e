"""The quickstart's guard rails and the example scripts (the full quickstart run is `make quickstart`)."""

import importlib.util
import os

import torch
import yaml

from dfm_diffusers.quickstart import DEFAULT_CONFIG, main as quickstart_main, pyramid_demo
from dfm_diffusers.training.config import load_config
from dfm_diffusers.training.dit import DiTTrainingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_without_dataset_says_how_to_get_it_and_stops(tmp_path, capsys):
    code = quickstart_main(["--output-dir", str(tmp_path / "qs"), "--data_dir", str(tmp_path / "missing"), "--cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in err and "zalando-datasets/fashion_mnist" in err
    assert not (tmp_path / "qs" / "checkpoints").exists() and not (tmp_path / "qs" / "pipeline").exists()


def test_pyramid_demo_figures(tmp_path):
    from PIL import Image

    paths = pyramid_demo(str(tmp_path), num_stages=3, resolution=64)
    # 2 rows (bands; previews) x 3 stages of 64px tiles with 2px padding
    assert Image.open(paths["pyramid"]).size == (3 * 66 + 2, 2 * 66 + 2)
    assert Image.open(paths["schedule"]).size == (640, 400)


def test_example_configs_load():
    folder = os.path.join(ROOT, "examples", "configs")
    dit_configs = [f for f in os.listdir(folder) if "dit" in f or "quickstart" in f]
    assert os.path.join(ROOT, DEFAULT_CONFIG).endswith("quickstart_fashion_mnist.yaml")
    for name in dit_configs:
        config = load_config(DiTTrainingConfig, os.path.join(folder, name))
        raw = yaml.safe_load(open(os.path.join(folder, name)))
        assert config.model == raw["model"]


def test_generate_dit_example(tmp_path):
    from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMScheduler

    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset(
        "DFM-DiT-T/4", in_channels=1, sample_size=16, num_classes=3, num_layers=1, num_attention_heads=2,
        attention_head_dim=16,
    )
    DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2)).save_pretrained(tmp_path / "pipe")
    spec = importlib.util.spec_from_file_location("generate_dit", os.path.join(ROOT, "examples", "generate_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "grid.png"
    module.main([str(tmp_path / "pipe"), "--per-class", "2", "--steps-per-stage", "2", "1", "--tile", "16",
                 "--out", str(out)])
    from PIL import Image

    assert Image.open(out).size == (2 * 18 + 2, 3 * 18 + 2)  # 2 columns, 3 classes, 16px tiles + 2px pads
    assert Image.open(tmp_path / "grid_previews.png").size == (2 * 18 + 2, 3 * 18 + 2)  # 2 stages


def test_resume_alias_and_overrides():
    config = load_config(DiTTrainingConfig, None, ["--resume", "latest", "--stage_weights", "[0.8, 0.2]",
                                                   "--max-train-steps=7"])
    assert config.resume_from_checkpoint == "latest" and config.stage_weights == [0.8, 0.2]
    assert config.max_train_steps == 7
    import pytest

    with pytest.raises(ValueError, match="no_such_key: unknown setting"):
        load_config(DiTTrainingConfig, None, ["--no_such_key", "1"])


def test_unknown_model_kwargs_are_named():
    import pytest

    from dfm_diffusers.training.dit import build_model

    with pytest.raises(ValueError, match=r"model_kwargs: unknown keys \['num_layer'\]"):
        load_config(DiTTrainingConfig, None, ["--model", "DFM-DiT-T/4", "--model_kwargs", "{num_layer: 2}"])
    config = DiTTrainingConfig(model="DFM-DiT-T/4", model_kwargs={"num_layer": 2})
    with pytest.raises(ValueError, match=r"unknown keys \['num_layer'\]"):
        build_model(config, in_channels=1, sample_size=32, num_classes=10)
