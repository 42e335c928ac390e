"""Sample-quality evaluation that works offline (``python -m dfm_diffusers.evaluation {train-classifier,sample,score}``).

- ``FeatureClassifier``: a small ResNet trained once on the real data (>= 90% test accuracy on Fashion-MNIST),
  saved with its measured accuracy; its penultimate layer is the feature space of FD and precision/recall.
- Metrics on 8-bit images: Frechet distance, multiscale sliced Wasserstein distance on Laplacian-pyramid patches
  (weight-free, per level = per DFM stage), k-NN precision/recall; Inception FID / DINOv2 FDD only with
  user-supplied weights.
- ``sample_pipeline`` / ``score_images``: the in-process versions of the ``sample`` and ``score`` commands.
"""

from .classifier import (
    CLASSIFIER_PRESETS,
    ClassifierTrainingConfig,
    FeatureClassifier,
    classifier_accuracy,
    classifier_preset,
    estimate_training_seconds,
    extract_features,
    load_feature_classifier,
    load_or_train_classifier,
    predict,
    save_feature_classifier,
    train_classifier_on_dataset,
    train_feature_classifier,
)
from .data import balanced_labels, dataset_images, load_samples, save_samples
from .metrics import (
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    knn_radii,
    precision_recall,
    quantize_to_uint8,
    sliced_wasserstein_distance,
    uint8_to_tensor,
)
from .pretrained import MissingWeightsError, dinov2_frechet_distance, inception_fid
from .sampling import sample_pipeline
from .scoring import Reference, classifier_fingerprint, score_images

__all__ = [
    "CLASSIFIER_PRESETS",
    "ClassifierTrainingConfig",
    "FeatureClassifier",
    "MissingWeightsError",
    "Reference",
    "balanced_labels",
    "classifier_accuracy",
    "classifier_fingerprint",
    "classifier_preset",
    "dataset_images",
    "dinov2_frechet_distance",
    "estimate_training_seconds",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "inception_fid",
    "knn_radii",
    "load_feature_classifier",
    "load_or_train_classifier",
    "load_samples",
    "precision_recall",
    "predict",
    "quantize_to_uint8",
    "sample_pipeline",
    "save_feature_classifier",
    "save_samples",
    "score_images",
    "sliced_wasserstein_distance",
    "train_classifier_on_dataset",
    "train_feature_classifier",
    "uint8_to_tensor",
]
