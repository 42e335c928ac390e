"""Training data: Fashion-MNIST from its IDX files, image folders and Hub data sets, pre-encoded latent shards.

Command line: ``python -m dfm_diffusers.data encode --source ... --vae ... --resolution 256 --output DIR`` encodes
images into latent shards; ``python -m dfm_diffusers.data info --source ...`` describes a source; ``python -m dfm_diffusers.data band-stats
--dataset ... --num_stages 2`` measures the per-stage scale of its Laplacian bands (:func:`band_statistics`).
"""

from .band_stats import STAGE_SCALE_MODES, BandStatistics, band_statistics, estimate_stage_scales
from .captions import CAPTION_COLUMN_NAMES, CaptionedImageDataset, build_captioned_image_dataset
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_HUB_ID,
    FashionMNISTNotFoundError,
    load_fashion_mnist,
    read_idx,
)
from .image_dataset import ImageDataset, build_image_dataset, preprocess_image
from .encoding import encode_latent_shards
from .latents import (
    LATENT_METADATA_FILE,
    LatentShardDataset,
    encode_images,
    is_latent_dir,
    write_latent_shards,
)
from .preload import PRELOAD_MODES, PreloadedDataset, preload_dataset
from .seeded import SeededSamples

__all__ = [
    "STAGE_SCALE_MODES",
    "BandStatistics",
    "band_statistics",
    "estimate_stage_scales",
    "CAPTION_COLUMN_NAMES",
    "CaptionedImageDataset",
    "build_captioned_image_dataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_HUB_ID",
    "FashionMNISTNotFoundError",
    "ImageDataset",
    "LATENT_METADATA_FILE",
    "LatentShardDataset",
    "PRELOAD_MODES",
    "PreloadedDataset",
    "SeededSamples",
    "build_image_dataset",
    "encode_images",
    "encode_latent_shards",
    "write_latent_shards",
    "preload_dataset",
    "is_latent_dir",
    "load_fashion_mnist",
    "preprocess_image",
    "read_idx",
]
