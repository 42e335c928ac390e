"""Fault injection, configs: every bad setting is named (key: problem) in ONE error, before any data or model loads.

In-process and fast: load_config / check_config / the trainers' entry points with the data set and model builders
replaced by functions that fail the test if they are reached.
"""

import dataclasses
import importlib.util
import json
import os
import re
import typing

import pytest
import yaml

from dfm_diffusers.training import dit as dit_module
from dfm_diffusers.training import flux as flux_module
from dfm_diffusers.training.config import (
    ConfigError, check_config, coerce, config_problems, field_help, load_config, parse_cli, run_cli, setting, type_name,
)
from dfm_diffusers.training.dit import DiTTrainingConfig, train_dit
from dfm_diffusers.training.flux import FluxTrainingConfig, train_flux

pytestmark = pytest.mark.faults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems_of(cls, *overrides, path=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, [str(o) for o in overrides])
    assert str(info.value).count("\n") == len(info.value.problems)  # header + one line per problem
    return info.value.problems


# One bad setting each: (overrides, the key the problem line must start with, a fragment of the problem).
SINGLE_FAULTS = [
    (["--max_train_steps", "abc"], "max_train_steps", "must be an integer, got 'abc'"),
    (["--max_train_steps", 0], "max_train_steps", ">= 1, got 0"),
    (["--max_train_steps", -5], "max_train_steps", ">= 1, got -5"),
    (["--gradient_accumulation_steps", 0], "gradient_accumulation_steps", ">= 1"),
    (["--log_every", 0], "log_every", ">= 1"),
    (["--train_batch_size", 0], "train_batch_size", ">= 1"),
    (["--ema_decay", 1.0], "ema_decay", "in (0.0, 1.0)"),
    (["--ema_decay", 0], "ema_decay", "in (0.0, 1.0)"),
    (["--ema_decay", "nan"], "ema_decay", "in (0.0, 1.0)"),
    (["--checkpointing_steps", -1], "checkpointing_steps", ">= 0"),
    (["--checkpoints_total_limit", 0], "checkpoints_total_limit", ">= 1"),
    (["--learning_rate", 0], "learning_rate", "in (0.0, inf)"),
    (["--learning_rate", "fast"], "learning_rate", "must be a number, got 'fast'"),
    (["--adam_beta2", 1.0], "adam_beta2", "in [0.0, 1.0)"),
    (["--seed", -1], "seed", "[0, 2**32)"),
    (["--mixed_precision", "fp32"], "mixed_precision", "one of 'no', 'fp16', 'bf16', got 'fp32'"),
    (["--lr_scheduler", "cosin"], "lr_scheduler", "did you mean 'cosine'?"),
    (["--use_ema", "maybe"], "use_ema", "must be a boolean"),
    (["--steps_per_stage", "[a, 2]"], "steps_per_stage", "element 0 must be an integer, got 'a'"),
    (["--model_kwargs", 3], "model_kwargs", "must be a mapping"),
    (["--model_kwargs", "{num_layer: 2}"], "model_kwargs", "unknown keys ['num_layer'] (did you mean 'num_layers'?)"),
    (["--sigma_sampling", "gauss"], "sigma_sampling", "one of 'logit_normal', 'uniform'"),
    (["--logit_std", 0], "logit_std", "in (0.0, inf)"),
    (["--model", "DFM-DiT-B/3"], "model", "unknown model 'DFM-DiT-B/3'"),
    (["--sample_class_labels", "[0, 10]"], "sample_class_labels", "0 .. 9 (fashion_mnist has 10 classes), got [10]"),
    (["--sample_class_labels", "[-1]"], "sample_class_labels", "got [-1]"),
    (["--stage_weights", "[0.5, 0.3, 0.2]"], "stage_weights", "num_stages = 2 entries, got 3"),
    (["--stage_weights", "[1.0, 0]"], "stage_weights", "entries must be positive"),
    (["--stage_loss_weights", "[1.0]"], "stage_loss_weights", "num_stages = 2 entries, got 1"),
    (["--steps_per_stage", "[30]"], "steps_per_stage", "num_stages = 2 entries, got 1"),
    (["--steps_per_stage", "[30, 0]"], "steps_per_stage", "integers >= 1"),
    (["--stage_thresholds", "[0.3, 0.1]"], "stage_thresholds", "num_stages - 1 = 1 entries, got 2"),
    (["--stage_thresholds", "[1.5]"], "stage_thresholds", "strictly inside (0, 1)"),
    (["--stage_scales", "[1.0]"], "stage_scales", "num_stages = 2 entries, got 1"),
    (["--num_stages", 3, "--model", "DFM-DiT-T/2"], "num_stages", "coarsest stage's patch size would be fractional"),
    (["--stage_factors", 1], "stage_factors", "integer >= 2"),
    (["--model", "DFM-DiT-T/4", "--resolution", 30], "resolution", "30 must be divisible by 4"),
    (["--resolution", 0], "resolution", ">= 1"),
    (["--max_samples", 0], "max_samples", ">= 1"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-9"], "resume_from_checkpoint", "not a checkpoint folder"),
    (["--max_train_step", 5], "max_train_step", "unknown setting (did you mean 'max_train_steps'?)"),
    (["--resolution"], "resolution", "needs a value"),
]


@pytest.mark.parametrize("overrides, key, fragment", SINGLE_FAULTS, ids=[f"{k}-{i}" for i, (_, k, _) in
                                                                        enumerate(SINGLE_FAULTS)])
def test_each_bad_setting_is_named_by_its_key(overrides, key, fragment):
    problems = problems_of(DiTTrainingConfig, *overrides)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ") and fragment in problems[0], problems[0]


def test_all_problems_of_file_and_command_line_in_one_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "DFM-DiT-T/4", "resolution": 30, "ema_decay": 1.5, "lerning_rate": 1e-3,
                                    "mixed_precision": False}))
    args = []
    for overrides, key, _ in SINGLE_FAULTS:  # one fault per key that the file does not already set
        if key not in ("model", "resolution", "ema_decay", "num_stages", "max_train_step", "learning_rate",
                       "mixed_precision", "stage_factors") and key not in [a[2:] for a in args]:
            args += [str(o) for o in overrides]
    problems = problems_of(DiTTrainingConfig, *args, path=path)
    keys = [p.split(":")[0] for p in problems]
    expected = {"resolution", "ema_decay", "lerning_rate", "mixed_precision", "max_train_steps", "log_every",
                "gradient_accumulation_steps", "train_batch_size", "checkpointing_steps", "seed", "lr_scheduler",
                "use_ema", "steps_per_stage", "model_kwargs", "sigma_sampling", "logit_std", "sample_class_labels",
                "stage_weights", "stage_loss_weights", "stage_thresholds", "stage_scales", "max_samples",
                "resume_from_checkpoint"}
    assert expected <= set(keys), sorted(expected - set(keys))
    assert len(keys) == len(set(keys)) + keys.count("steps_per_stage") - 1  # one line per key (bar list entries)
    assert any(p.startswith("lerning_rate: unknown setting (did you mean 'learning_rate'?)") for p in problems)
    assert any(p.startswith("mixed_precision:") and "quote the value" in p for p in problems)  # YAML's `no` is False


def test_config_built_in_python_is_checked_with_wrong_types_and_ranges_together():
    config = DiTTrainingConfig(max_train_steps="abc", learning_rate=-1.0, use_ema="sometimes", stage_weights=[1, 2, 3])
    problems = config_problems(config)
    assert problems == [
        "max_train_steps: must be an integer, got 'abc'",
        "use_ema: must be a boolean (true/false), got 'sometimes'",
        "learning_rate: must be a number in (0.0, inf), got -1.0",
        "stage_weights: must hold num_stages = 2 entries, got 3: [1.0, 2.0, 3.0]",
    ]
    with pytest.raises(ConfigError, match="4 problems in the DiTTrainingConfig settings"):
        check_config(config)
    check_config(DiTTrainingConfig())  # the defaults are valid


def test_values_are_converted_to_their_hinted_types(tmp_path):
    config = load_config(DiTTrainingConfig, None, [
        "--learning_rate", "1e-4", "--adam_epsilon=1E-6", "--logit_mean", "0", "--use_ema", "no", "--random_flip=1",
        "--center_crop", "off", "--mixed_precision", "no", "--output_dir", "2024", "--stage_weights", "[1, 3]",
        "--max_samples", "null", "--steps_per_stage", "[4, 2]", "--model-kwargs", "{num_layers: 2}",
        "--previous_logit_mean", "-0.5",
    ])
    assert config.previous_logit_mean == -0.5  # a negative number is a value, not a flag
    assert config.learning_rate == 1e-4 and config.adam_epsilon == 1e-6 and type(config.logit_mean) is float
    assert (config.use_ema, config.random_flip, config.center_crop) == (False, True, False)
    assert config.mixed_precision == "no" and config.output_dir == "2024"  # the text as written, not YAML's False/int
    assert config.stage_weights == [1.0, 3.0] and all(type(w) is float for w in config.stage_weights)
    assert config.max_samples is None and config.steps_per_stage == [4, 2] and config.model_kwargs == {"num_layers": 2}
    # unions as other helpers add them (stage_scales "auto" or a list of floats)
    hint = typing.Optional[typing.Union[list[float], str]]
    assert coerce("auto", hint, "auto") == "auto" and coerce([1, 0.5], hint) == [1.0, 0.5]
    assert coerce(None, hint) is None
    assert coerce(2, int | list[int]) == 2 and coerce([2, 4], int | list[int]) == [2, 4]
    assert type_name(hint) == "list[float] | str | None"


def test_bare_boolean_flags_do_not_swallow_the_next_flag():
    config = load_config(DiTTrainingConfig, None, ["--gradient_checkpointing", "--use_8bit_adam", "--max_train_steps",
                                                   "5", "--use_ema", "false", "--random_flip"])
    assert config.gradient_checkpointing and config.use_8bit_adam and config.random_flip
    assert config.max_train_steps == 5 and config.use_ema is False
    assert load_config(DiTTrainingConfig, None, ["--torch_compile=false"]).torch_compile is False
    problems = problems_of(DiTTrainingConfig, "--gradient_checkpoint", "--model", "--use_8bit_adam")
    assert problems == ["gradient_checkpoint: unknown setting (did you mean 'gradient_checkpointing'?); `--help` "
                        "lists them all", "model: needs a value (--model VALUE)"]


@pytest.mark.parametrize("cls", [DiTTrainingConfig, FluxTrainingConfig])
def test_help_lists_every_setting_with_type_default_and_help(cls, capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(cls, ["--max_train_steps", "abc", "--help"], "the trainer")
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert field_help(cls, f.name), f"{cls.__name__}.{f.name} has no help text"
        entry = f"--{f.name} {type_name(hints[f.name])} {field_help(cls, f.name)} (default: {default!r})"
        assert entry in text, entry
    assert "--mixed_precision {'no', 'fp16', 'bf16'}" in text and "--config PATH" in text


def test_new_fields_are_covered_by_the_generic_checks(capsys):
    @dataclasses.dataclass
    class WithNewField(DiTTrainingConfig):
        future_fraction: float = setting(0.1, "fraction of unreadable samples a run tolerates")

        def validate(self):
            return [] if 0 <= self.future_fraction <= 1 else ["future_fraction: must be in [0, 1]"]

    assert problems_of(WithNewField, "--future_fraction", "lots", "--log_every", 0) == [
        "future_fraction: must be a number, got 'lots'", "log_every: must be an integer >= 1, got 0"]
    assert problems_of(WithNewField, "--future_fraction", 2) == ["future_fraction: must be in [0, 1]"]
    with pytest.raises(SystemExit):
        parse_cli(WithNewField, ["-h"])
    assert "--future_fraction float fraction of unreadable" in " ".join(capsys.readouterr().out.split())


def _never(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called although the config is invalid")

    return fail


def test_dit_checks_everything_before_the_data_set_or_model(tmp_path, monkeypatch):
    monkeypatch.setattr(dit_module, "build_dataset", _never("build_dataset"))
    monkeypatch.setattr(dit_module, "build_model", _never("build_model"))
    out = tmp_path / "out"
    config = DiTTrainingConfig(output_dir=str(out), max_train_steps=0, log_every=0, ema_decay=1.0, model="DiT-Q/3")
    with pytest.raises(ConfigError) as info:
        train_dit(config)
    assert [p.split(":")[0] for p in info.value.problems] == ["max_train_steps", "log_every", "ema_decay", "model"]
    # through the script: exit status 2 and every problem on stderr
    spec = importlib.util.spec_from_file_location("train_dfm_dit", os.path.join(ROOT, "train_dfm_dit.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: script.main(["--output_dir", str(out), "--max_train_steps", "abc", "--ema_decay", "2"]))
    assert exit_info.value.code == 2
    assert not out.exists(), "nothing may be written before the settings are checked"


def test_dit_class_labels_are_checked_against_the_data_before_the_model(tmp_path, monkeypatch, capsys):
    class ThreeClasses:
        num_classes = 3

    monkeypatch.setattr(dit_module, "build_dataset", lambda config: ThreeClasses())
    monkeypatch.setattr(dit_module, "build_model", _never("build_model"))
    config = DiTTrainingConfig(output_dir=str(tmp_path / "out"), dataset=str(tmp_path), sample_class_labels=[0, 2, 5])
    with pytest.raises(ConfigError, match=r"sample_class_labels: labels must be in 0 \.\. 2 .*3 classes.*got \[5\]"):
        train_dit(config)


def _fake_pipeline_folder(root, class_name="DFMPipeline", num_stages=2):
    """The three small JSON files train_flux reads before loading anything (no weights)."""
    for sub, content in {"": {"_class_name": class_name}, "transformer": {"num_stages": num_stages, "stage_factors": 2},
                         "vae": {"block_out_channels": [8, 8, 8, 8]}}.items():
        os.makedirs(root / sub, exist_ok=True)
        (root / sub / ("model_index.json" if not sub else "config.json")).write_text(json.dumps(content))
    return root


def test_flux_checks_everything_before_the_data_set_or_pipeline(tmp_path, monkeypatch):
    for name in ("build_flux_dataset", "load_dfm_pipeline", "prepare_trainable"):
        monkeypatch.setattr(flux_module, name, _never(name))
    with pytest.raises(ConfigError) as info:
        train_flux(FluxTrainingConfig(lora_rank=0, caption_dropout=1.5, weight_dtype="bfloat16", max_train_steps=-1))
    assert [p.split(":")[0] for p in info.value.problems] == [
        "max_train_steps", "pretrained", "dataset", "caption_dropout", "weight_dtype", "lora_rank"]
    # a local pipeline folder: its number of stages and VAE factor are read (JSON only) to check lists and resolution
    folder = _fake_pipeline_folder(tmp_path / "dfm")
    problems = problems_of(FluxTrainingConfig, "--pretrained", folder, "--dataset", tmp_path, "--resolution", 100,
                           "--stage_weights", "[1, 2, 3]", "--stage_thresholds", "[0.1]", "--lora_target_modules",
                           "[]", "--gradient_checkpointing", "--mixed_precision", "bf16")
    assert problems == [
        "lora_target_modules: must name at least one module",
        "resolution: 100 must be divisible by 16 (VAE factor 8 x the 2x2 packing and stage factors [2])",
        "stage_weights: must hold num_stages = 2 entries, got 3: [1.0, 2.0, 3.0]",
    ]
    problems = problems_of(FluxTrainingConfig, "--pretrained", _fake_pipeline_folder(tmp_path / "x", "StableDiffusion"),
                           "--dataset", tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pretrained: ") and "StableDiffusion" in problems[0]


def test_quickstart_stops_on_bad_settings_before_writing_anything(tmp_path, monkeypatch, capsys):
    import dfm_diffusers.quickstart as quickstart

    monkeypatch.setattr(quickstart, "pyramid_demo", _never("pyramid_demo"))
    monkeypatch.setattr(dit_module, "build_dataset", _never("build_dataset"))
    code = quickstart.main(["--output-dir", str(tmp_path / "qs"), "--cpu", "--max_train_steps", "0", "--lerning_rate",
                            "1"])
    err = capsys.readouterr().err
    assert code == 2 and "max_train_steps: must be an integer >= 1" in err
    assert "lerning_rate: unknown setting (did you mean 'learning_rate'?)" in err
    assert not (tmp_path / "qs").exists()


def test_example_configs_validate():
    folder = os.path.join(ROOT, "examples", "configs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert len(names) >= 6
    for name in names:
        from dfm_diffusers.vae.training import VAETrainingConfig

        cls = FluxTrainingConfig if "flux" in name else VAETrainingConfig if "vae" in name else DiTTrainingConfig
        config = load_config(cls, os.path.join(folder, name))  # raises ConfigError on any problem
        raw = yaml.safe_load(open(os.path.join(folder, name)))
        assert all(getattr(config, k) == v for k, v in raw.items() if not isinstance(v, float)), name
        assert config_problems(config) == []


def test_bad_config_file_is_reported_with_the_rest(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    problems = problems_of(DiTTrainingConfig, "--log_every", 0, path=listing)
    assert problems[0].startswith("config: ") and "must hold a mapping" in problems[0]
    assert problems[1].startswith("log_every: ")
    problems = problems_of(DiTTrainingConfig, path=tmp_path / "missing.yaml")
    assert re.match(r"config: cannot read .*missing\.yaml", problems[0])
