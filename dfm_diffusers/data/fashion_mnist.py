"""Fashion-MNIST from its original gzipped IDX files (as shipped by Debian's ``dataset-fashion-mnist`` package).

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; MIT licence): 70,000 28x28 grayscale images of 10 clothing classes,
60,000 for training and 10,000 for testing. It is the project's offline real-image data set.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where they were looked for."""


def fashion_mnist_files(data_dir: str | os.PathLike | None = None, split: str = "train") -> tuple[str, str]:
    """Paths of the (images, labels) IDX files of a split; gzipped (``.gz``) or plain files are accepted.

    Raises:
        ValueError: unknown split.
        FashionMNISTNotFoundError: a file is missing; the message says how to get the data.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    data_dir = os.fspath(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = _SPLIT_PREFIX[split]
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        candidates = [os.path.join(data_dir, name + ".gz"), os.path.join(data_dir, name)]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            raise FashionMNISTNotFoundError(
                f"Fashion-MNIST file {name}.gz not found in {data_dir}. Get the data in one of these ways:\n"
                f"  - on Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs the files into "
                f"{FASHION_MNIST_DIR});\n"
                f"  - download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist into a "
                f"folder and pass it as data_dir (--data-dir on the command line);\n"
                f"  - or use the Hugging Face Hub copy: source / --dataset '{FASHION_MNIST_HUB_ID}'."
            )
        paths.append(found)
    return paths[0], paths[1]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stored shape and type.

    Raises:
        ValueError: the file is not a valid IDX file (bad magic number, unknown type, truncated data).
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"could not read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but {len(data) - header} follow")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split from its IDX files.

    Args:
        data_dir: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; default
            ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
        split: "train" (60,000 images) or "test" (10,000).

    Returns:
        (images uint8 [N, 28, 28], labels int64 [N] in 0..9); class names are ``FASHION_MNIST_CLASSES``.

    Raises:
        FashionMNISTNotFoundError (a FileNotFoundError) with instructions when the files are missing;
        ValueError when they are not valid Fashion-MNIST IDX files.
    """
    images_path, labels_path = fashion_mnist_files(data_dir, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: labels must be in 0..9, found {int(labels.max())}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
