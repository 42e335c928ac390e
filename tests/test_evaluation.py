"""dfm_diffusers.evaluation: metrics against closed forms / brute force / known orderings, the feature classifier,
pretrained-feature metrics (no-weights errors, a tiny DINOv2), and the sample + score commands end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfm_diffusers.evaluation import (
    CLASSIFIER_PRESETS,
    ClassifierTrainingConfig,
    FeatureClassifier,
    MissingWeightsError,
    Reference,
    classifier_accuracy,
    classifier_fingerprint,
    classifier_preset,
    dataset_images,
    dinov2_frechet_distance,
    estimate_training_seconds,
    extract_features,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_fid,
    load_feature_classifier,
    load_samples,
    precision_recall,
    quantize_to_uint8,
    sample_pipeline,
    save_feature_classifier,
    score_images,
    sliced_wasserstein_distance,
    train_feature_classifier,
    uint8_to_tensor,
)
from dfm_diffusers.evaluation.__main__ import build_parser, classifier_config
from dfm_diffusers.evaluation.__main__ import main as evaluation_main
from dfm_diffusers.evaluation.classifier import augment
from dfm_diffusers.evaluation.pretrained import dinov2_features, load_dinov2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLASSIFIER = ClassifierTrainingConfig(steps=8, batch_size=16, widths=[8, 16], blocks_per_stage=1, warmup_steps=2)


# ---------------------------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    n, d = 200000, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9
    # N(mu_a, diag(s_a^2)) vs N(mu_b, diag(s_b^2)): |mu_a - mu_b|^2 + sum (s_a - s_b)^2
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 3.0])
    mu_a, mu_b = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    x = mu_a + s_a * torch.randn(n, d, generator=g)
    y = mu_b + s_b * torch.randn(n, d, generator=g)
    expected = float((mu_a - mu_b).pow(2).sum() + (s_a - s_b).pow(2).sum())
    assert math.isclose(frechet_distance(x, y), expected, rel_tol=0.02)
    # symmetric, and invariant to a common rotation
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    assert math.isclose(frechet_distance(y, x), frechet_distance(x, y), rel_tol=1e-6)
    assert math.isclose(frechet_distance(x @ q, y @ q), frechet_distance(x, y), rel_tol=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    from scipy import linalg

    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(d), b @ b.T / d
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    reference = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    ours = frechet_distance_from_statistics(*(torch.from_numpy(t) for t in (mu_a, cov_a, mu_b, cov_b)))
    assert math.isclose(ours, reference, rel_tol=1e-8)


# ----------------------------------------------------------------------------------------------- 8-bit images


def test_quantization_and_real_images_match_the_training_data():
    pt = torch.tensor([0.0, 0.5, 1.0, 1.3, -0.2, 0.2 / 255]).reshape(1, 1, 2, 3)
    assert quantize_to_uint8(pt).ravel().tolist() == [0, 128, 255, 255, 0, 0]
    assert quantize_to_uint8(pt * 2 - 1, (-1, 1)).ravel().tolist() == [0, 128, 255, 255, 0, 0]
    np_nhwc = quantize_to_uint8(np.full((2, 4, 4, 3), 0.25))
    assert np_nhwc.shape == (2, 4, 4, 3) and (np_nhwc == 64).all()

    from dfm_diffusers.data import build_image_dataset

    images, labels = dataset_images("fashion_mnist", "test", 32, max_samples=16)
    dataset = build_image_dataset("fashion_mnist", 32, random_flip=False, split="test", max_samples=16)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(16)])
    assert images.dtype == np.uint8 and images.shape == (16, 32, 32, 1)
    torch.testing.assert_close(uint8_to_tensor(images), pixels, rtol=0, atol=1e-6)  # the loader's exact input
    assert labels.tolist() == [int(dataset[i]["class_labels"]) for i in range(16)]


# ------------------------------------------------------------------------------------------------------- SWD


def smooth_fields(n, seed):
    """uint8 [n, 32, 32, 1] random smooth images with some finer structure."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 1, 8, 8, generator=g), size=32, mode="bicubic", align_corners=False)
    x = x + 0.3 * F.interpolate(torch.randn(n, 1, 16, 16, generator=g), size=32, mode="bilinear", align_corners=False)
    return quantize_to_uint8(x.tanh(), (-1, 1))


SWD_FAST = dict(patches_per_image=16, directions=64, repeats=2)


def test_swd_is_zero_for_identical_sets_and_orders_degradations_by_level():
    real, other = smooth_fields(256, 0), smooth_fields(256, 1)
    same = sliced_wasserstein_distance(real, real, **SWD_FAST)
    assert list(same["levels"]) == ["32", "16"] and max(same["levels"].values()) < 1e-6
    floor = sliced_wasserstein_distance(real, other, **SWD_FAST)
    assert floor == sliced_wasserstein_distance(real, other, **SWD_FAST)  # seeded: deterministic
    assert floor != sliced_wasserstein_distance(real, other, seed=1, **SWD_FAST)
    rng = np.random.default_rng(0)
    noisy = [
        sliced_wasserstein_distance(real, np.clip(other + rng.normal(0, s, other.shape), 0, 255).round()
                                    .astype(np.uint8), **SWD_FAST)
        for s in (8, 24, 64)
    ]
    fine = [floor["levels"]["32"]] + [r["levels"]["32"] for r in noisy]
    assert all(b > a for a, b in zip(fine, fine[1:])), fine  # more pixel noise, larger fine-level distance
    assert fine[-1] > 3 * fine[0]
    # pixel noise is a fine-level defect: the 16 px low-pass level barely moves
    assert noisy[-1]["levels"]["16"] < 1.5 * floor["levels"]["16"]
    assert math.isclose(noisy[0]["mean"], np.mean(list(noisy[0]["levels"].values())))
    # a blurred set loses its detail band
    blurred = quantize_to_uint8(
        F.interpolate(F.avg_pool2d(uint8_to_tensor(other), 2), scale_factor=2, mode="bilinear"), (-1, 1)
    )
    blur = sliced_wasserstein_distance(real, blurred, **SWD_FAST)
    assert blur["levels"]["32"] > 1.5 * floor["levels"]["32"]
    assert blur["levels"]["32"] - floor["levels"]["32"] > 2 * (blur["levels"]["16"] - floor["levels"]["16"])


# ------------------------------------------------------------------------------------------- precision/recall


def brute_force_precision_recall(real, fake, k):
    def radii(x):
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]

    def covered(query, support, r):
        return float(np.mean((np.linalg.norm(query[:, None] - support[None], axis=-1) <= r[None]).any(1)))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_on_gaussians():
    g = torch.Generator().manual_seed(0)
    n, d = 1500, 8
    real = torch.randn(n, d, generator=g)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    same = precision_recall(real, torch.randn(n, d, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    assert precision_recall(real, torch.randn(n, d, generator=g) + 10) == {"precision": 0.0, "recall": 0.0}
    narrow = precision_recall(real, 0.3 * torch.randn(n, d, generator=g))  # a mode-collapsed generator
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.1
    wide = precision_recall(real, 3 * torch.randn(n, d, generator=g))  # a noisy generator
    assert wide["precision"] < 0.1 and wide["recall"] > 0.95
    # exact against a brute-force numpy reference, k = 3 and 5, small batches
    a, b = torch.randn(300, 4, generator=g), 1.3 * torch.randn(250, 4, generator=g) + 0.5
    for k in (3, 5):
        ours = precision_recall(a, b, k=k, batch_size=64)
        ref = brute_force_precision_recall(a.double().numpy(), b.double().numpy(), k)
        assert abs(ours["precision"] - ref[0]) <= 1 / 250 and abs(ours["recall"] - ref[1]) <= 1 / 300


# ---------------------------------------------------------------------------------------------- the classifier


def test_augment_crops_with_background_padding_and_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    assert torch.equal(augment(x, 0, False, g), x)
    flipped = augment(x, 0, True, g)
    is_flip = (flipped == x.flip(-1)).flatten(1).all(1)
    assert ((flipped == x).flatten(1).all(1) | is_flip).all() and 10 < int(is_flip.sum()) < 54
    cropped = augment(x, 2, False, g)
    assert cropped.shape == x.shape
    for i in range(8):  # every crop is the image shifted by (dy, dx) in [-2, 2] with -1 filled in
        padded = F.pad(x[i], (2, 2, 2, 2), value=-1.0)
        assert any(torch.equal(cropped[i], padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))


def test_feature_classifier_learns_a_separable_toy_task():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (512,), generator=g)
    images = torch.randn(512, 1, 8, 8, generator=g) * 0.3
    images[labels == 1, :, :4] += 1.0  # class 1: bright top half
    config = ClassifierTrainingConfig(widths=[8, 16], blocks_per_stage=1, warmup_steps=5, random_flip=False)
    model = train_feature_classifier(images, labels, 2, steps=40, batch_size=32, lr=3e-3, config=config,
                                     progress=False)
    assert isinstance(model, FeatureClassifier) and extract_features(model, images[:3]).shape == (3, 16)
    assert classifier_accuracy(model, images, labels) > 0.95


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A tiny classifier trained a few steps on 16 px Fashion-MNIST and saved."""
    images, labels = dataset_images("fashion_mnist", "train", 16, max_samples=64)
    model = train_feature_classifier(images, labels, 10, config=TINY_CLASSIFIER, progress=False)
    path = tmp_path_factory.mktemp("classifier")
    save_feature_classifier(model, path, test_accuracy=0.5, dataset="fashion_mnist 16px, first 64")
    return path, model, images


def test_classifier_save_load_round_trip_and_refusals(tiny_classifier_dir):
    path, model, images = tiny_classifier_dir
    loaded = load_feature_classifier(path)
    torch.testing.assert_close(extract_features(loaded, images), extract_features(model, images))
    record = json.loads((path / "classifier.json").read_text())
    assert record["test_accuracy"] == 0.5 and record["training"]["steps"] == TINY_CLASSIFIER.steps
    assert record["model_config"]["widths"] == [8, 16]
    with pytest.raises(ValueError, match="test accuracy 0.5000 < 0.9: .*--min-classifier-accuracy"):
        load_feature_classifier(path, min_test_accuracy=0.9)
    bad = path.parent / "no_accuracy"
    save_feature_classifier(model, bad, test_accuracy=0.5)
    record.pop("test_accuracy")
    (bad / "classifier.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="no test_accuracy"):
        load_feature_classifier(bad)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_feature_classifier(path.parent / "missing")


def test_train_classifier_command_records_accuracy_and_enforces_the_bar(tmp_path, caplog):
    args = ["train-classifier", "--out", str(tmp_path / "c"), "--steps", "3", "--batch-size", "8", "--widths", "4",
            "8", "--blocks-per-stage", "1", "--max-samples", "32", "--resolution", "16", "--device", "cpu"]
    with pytest.raises(ValueError, match="reaches only .* test accuracy"):  # 3 steps cannot reach 90%
        evaluation_main(args)
    assert "--preset cpu" in caplog.text  # the default recipe on a CPU points to the CPU one
    record = json.loads((tmp_path / "c" / "classifier.json").read_text())  # saved all the same, honestly labelled
    model = load_feature_classifier(tmp_path / "c")
    images, labels = dataset_images("fashion_mnist", "test", 16, max_samples=32)
    assert record["test_accuracy"] == classifier_accuracy(model, images, labels) < 0.9
    assert record["training"]["steps"] == 3 and record["dataset"]["test_images"] == 32
    assert record["fd_train_vs_test"] > 0
    assert evaluation_main(args + ["--min-test-accuracy", "0"])["test_accuracy"] == record["test_accuracy"]


def _parameters(config):
    return sum(p.numel() for p in FeatureClassifier(1, 10, config.widths, config.blocks_per_stage).parameters())


def test_cpu_preset_recipe_overrides_estimate_and_a_tiny_run(tmp_path, caplog):
    default, cpu = classifier_preset("default"), classifier_preset("cpu")
    assert default == ClassifierTrainingConfig() and sorted(CLASSIFIER_PRESETS) == ["cpu", "default"]
    # the CPU recipe: half the steps of half the batch on a classifier with < 1/8 of the parameters
    assert cpu.steps * 2 <= default.steps and cpu.batch_size * 2 <= default.batch_size
    assert _parameters(cpu) * 8 < _parameters(default)
    assert cpu.warmup_steps <= cpu.steps // 10
    cpu.steps = 1  # a copy: the preset table is untouched
    assert CLASSIFIER_PRESETS["cpu"].steps > 1
    with pytest.raises(ValueError, match="unknown classifier preset 'tpu'"):
        classifier_preset("tpu")

    def parsed(*flags):
        return classifier_config(build_parser().parse_args(["train-classifier", "--out", "x", *flags]))

    assert parsed() == ClassifierTrainingConfig() and parsed("--preset", "cpu") == CLASSIFIER_PRESETS["cpu"]
    override = parsed("--preset", "cpu", "--steps", "5", "--widths", "8", "16")
    assert (override.steps, override.widths, override.batch_size) == (5, [8, 16], CLASSIFIER_PRESETS["cpu"].batch_size)

    tiny = ClassifierTrainingConfig(**{**vars(CLASSIFIER_PRESETS["cpu"]), "steps": 10, "batch_size": 8})
    eta = estimate_training_seconds(tiny, 1, 16, eval_images=2048)
    assert eta["seconds_per_step"] > 0 and eta["eval_seconds"] > 0
    assert eta["train_seconds"] == pytest.approx(10 * eta["seconds_per_step"])
    assert eta["total_seconds"] == pytest.approx(eta["train_seconds"] + eta["eval_seconds"])

    caplog.set_level("INFO")
    out = tmp_path / "cpu"
    evaluation_main(["train-classifier", "--out", str(out), "--preset", "cpu", "--steps", "3", "--batch-size", "8",
                     "--max-samples", "32", "--resolution", "16", "--device", "cpu", "--min-test-accuracy", "0"])
    record = json.loads((out / "classifier.json").read_text())
    assert record["model_config"]["widths"] == CLASSIFIER_PRESETS["cpu"].widths
    assert record["model_config"]["blocks_per_stage"] == CLASSIFIER_PRESETS["cpu"].blocks_per_stage
    assert record["training"]["learning_rate"] == CLASSIFIER_PRESETS["cpu"].learning_rate
    assert record["training"]["steps"] == 3
    assert "feature classifier: about" in caplog.text and "3 steps x" in caplog.text  # printed before training
    assert "--preset cpu" not in caplog.text


# ------------------------------------------------------------------------------------ Inception FID / DINOv2 FD


def test_pretrained_metrics_refuse_to_run_without_weights(tmp_path):
    images = smooth_fields(4, 0)
    with pytest.raises(MissingWeightsError, match="Inception-v3 weights as a local file"):
        inception_fid(images, images, None)
    with pytest.raises(MissingWeightsError, match="DINOv2 model"):
        dinov2_frechet_distance(images, images, "")
    with pytest.raises(FileNotFoundError):
        inception_fid(images, images, str(tmp_path / "missing.pth"))
    if importlib.util.find_spec("torch_fidelity") is None:  # torchmetrics' InceptionV3 is torch-fidelity's
        (tmp_path / "weights.pth").write_bytes(b"")
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            inception_fid(images, images, str(tmp_path / "weights.pth"))


def test_dinov2_frechet_distance_with_a_tiny_local_model(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    model = load_dinov2(str(tmp_path / "dinov2"))
    real, fake = smooth_fields(40, 0), smooth_fields(40, 1)
    fake_noisy = np.clip(fake + np.random.default_rng(0).normal(0, 60, fake.shape), 0, 255).astype(np.uint8)
    # the features are the model's final CLS token on resized, ImageNet-normalized RGB
    x = torch.from_numpy(real[:3]).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).float() / 255
    x = F.interpolate(x, size=(28, 28), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(dinov2_features(model, real[:3]), cls)
    fd = dinov2_frechet_distance(real, fake_noisy, str(tmp_path / "dinov2"))
    expected = frechet_distance(dinov2_features(model, real), dinov2_features(model, fake_noisy))
    assert fd > 0 and math.isclose(fd, expected, rel_tol=1e-6)
    assert abs(dinov2_frechet_distance(real, real, str(tmp_path / "dinov2"))) < 1e-6


# ------------------------------------------------------------------------------------- sample + score commands


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMScheduler

    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset(
        "DiT-T/4", in_channels=1, sample_size=16, num_stages=2, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, num_classes=5,
    ).eval()
    with torch.no_grad():  # DiT's zero-init heads would make every output 0: randomise them
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    pipe = DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2, steps_per_stage=[2, 1]))
    path = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(path)
    return path, pipe


def test_sample_pipeline_is_balanced_seeded_per_sample_and_8bit(tiny_pipeline_dir):
    _, pipe = tiny_pipeline_dir
    images, labels = sample_pipeline(pipe, 12, batch_size=5, seed=3, progress=False)
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 1)
    assert labels.tolist() == [0, 1, 2, 3, 4] * 2 + [0, 1]
    again, _ = sample_pipeline(pipe, 12, batch_size=12, seed=3, progress=False)  # other batching, same noise
    assert np.abs(again.astype(int) - images.astype(int)).max() <= 1
    other, _ = sample_pipeline(pipe, 12, batch_size=12, seed=4, progress=False)
    assert np.abs(other.astype(int) - images.astype(int)).mean() > 5
    # the pipeline's own output, quantized: same images
    from dfm_diffusers.evaluation.sampling import sample_generators

    out = pipe(class_labels=labels[:5], generator=sample_generators(3, range(5)), output_type="np").images
    assert np.abs(quantize_to_uint8(out).astype(int) - images[:5].astype(int)).max() <= 1
    bf16, _ = sample_pipeline(pipe, 5, seed=3, autocast_dtype="bf16", progress=False)  # autocast: close, not equal
    assert 0 < np.abs(bf16.astype(int) - images[:5].astype(int)).mean() < 8
    with pytest.raises(ValueError, match="autocast_dtype"):
        sample_pipeline(pipe, 5, autocast_dtype="int8", progress=False)
    guided, _ = sample_pipeline(pipe, 5, seed=3, guidance_scale=3.0, steps_per_stage=[3, 2],
                                stage_thresholds=[0.5], progress=False)
    assert np.abs(guided.astype(int) - images[:5].astype(int)).mean() > 1


def test_sample_and_score_commands_end_to_end(tiny_pipeline_dir, tiny_classifier_dir, tmp_path):
    pipeline_dir, _ = tiny_pipeline_dir
    classifier_dir, classifier, _ = tiny_classifier_dir
    samples_path = tmp_path / "samples.npz"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(
        [sys.executable, "-m", "dfm_diffusers.evaluation", "sample", "--pipeline", str(pipeline_dir), "--out",
         str(samples_path), "--num-samples", "24", "--batch-size", "10", "--seed", "1", "--guidance-scale", "1.5",
         "--steps-per-stage", "2", "2", "--stage-thresholds", "0.4", "--device", "auto"],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    images, labels, metadata = load_samples(samples_path)
    assert images.shape == (24, 16, 16, 1) and labels.tolist() == list(range(5)) * 4 + [0, 1, 2, 3]
    assert metadata["guidance_scale"] == 1.5 and metadata["steps_per_stage"] == [2, 2]
    assert metadata["stage_thresholds"] == [0.4] and metadata["seed"] == 1

    out, cache = tmp_path / "scores.json", tmp_path / "reference.npz"
    score_args = [
        "score", str(samples_path), "--classifier", str(classifier_dir), "--reference", "fashion_mnist",
        "--split", "test", "--max-reference", "48", "--swd-min-resolution", "8", "--swd-patches-per-image", "8",
        "--out", str(out), "--device", "cpu", "--min-classifier-accuracy", "0.4", "--reference-cache", str(cache),
    ]
    result = evaluation_main(score_args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cached = Reference.load(cache)
    assert cached.images.shape == (48, 16, 16, 1) and cached.classifier_id == classifier_fingerprint(classifier)
    np.savez(cache, **{**dict(np.load(cache)), "features": np.zeros_like(cached.features.numpy())})
    with pytest.raises(ValueError, match="from another classifier"):  # features of other weights are refused
        score_images(images, labels, Reference.build(images, labels, FeatureClassifier(1, 10, [4], 1)), classifier)
    reference_images, _ = dataset_images("fashion_mnist", "test", 16, max_samples=48)
    expected = score_images(images, labels, Reference.build(reference_images, None, classifier), classifier,
                            swd_kwargs=dict(min_resolution=8, patches_per_image=8, device="cpu"))
    for key in ("fd", "precision", "recall", "class_agreement"):
        assert math.isclose(result[key], expected[key], rel_tol=1e-5, abs_tol=1e-9), key
    assert list(result["swd"]["levels"]) == ["16", "8"] and result["swd"] == expected["swd"]
    assert result["fd"] > 0 and result["num_samples"] == 24 and result["num_reference"] == 48
    assert result["classifier_test_accuracy"] == 0.5 and result["sample_metadata"]["seed"] == 1
    assert evaluation_main(score_args)["fd"] != result["fd"]  # the (tampered) cache was used, not rebuilt
    # an .npz reference: the samples against themselves
    self_score = evaluation_main(["score", str(samples_path), "--classifier", str(classifier_dir), "--reference",
                                  str(samples_path), "--swd-min-resolution", "8", "--device", "cpu",
                                  "--min-classifier-accuracy", "0"])
    assert abs(self_score["fd"]) < 1e-6 and self_score["precision"] == 1.0 and self_score["swd"]["mean"] == 0.0
    with pytest.raises(MissingWeightsError):  # --dinov2-fd without a model: an error, never a fallback
        evaluation_main(["score", str(samples_path), "--classifier", str(classifier_dir), "--reference",
                         str(samples_path), "--dinov2-fd", "--device", "cpu", "--min-classifier-accuracy", "0"])
    with pytest.raises(ValueError, match="test accuracy 0.5000 < 0.9"):  # the default bar for a feature space
        evaluation_main(["score", str(samples_path), "--classifier", str(classifier_dir), "--reference",
                         str(samples_path), "--device", "cpu"])
