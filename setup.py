from setuptools import find_packages, setup

setup(
    name="dfm-diffusers",
    version="0.1.0",
    description="Decomposable Flow Matching (arXiv 2506.19839) for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dfm_diffusers", "dfm_diffusers.*"]),
    python_requires=">=3.10",
    # Ranges the suite was run with (README, "Tested versions"): the lower bound is the oldest version tested
    # (the GPU machine's), the upper bound the next minor release after the newest tested (CI's), so that a fresh
    # install resolves to versions that were tested. `make test` installs the exact set in constraints.txt.
    install_requires=[
        "torch>=2.11,<2.14",
        "diffusers>=0.42.1,<0.43",
        "transformers>=5.17,<5.24",
        "accelerate>=1.15,<1.16",
        "peft>=0.21,<0.22",
        "datasets>=5.2,<5.3",
        "safetensors>=0.8,<0.9",
        "huggingface-hub>=1.33,<2.5",
        "bitsandbytes>=0.50,<0.51",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "numpy>=2,<3",
        "pillow>=10,<14",
        "sentencepiece>=0.2,<0.3",
        "protobuf",
        "tensorboard>=2.16,<3",
        "matplotlib>=3.8,<4",
        "scipy>=1.11,<2",
        "torchmetrics>=1.4,<2",
    ],
    extras_require={
        # gradio + gradio_client: tests/test_app.py drives the live demo like a browser would
        "test": ["pytest>=8,<10", "scikit-image>=0.24,<0.27", "gradio>=6.31,<7", "gradio_client>=2,<3"],
        # Inception FID through torchmetrics needs torch-fidelity's feature extractor (weights supplied by the user)
        "fid": ["torch-fidelity>=0.4,<0.5"],
        # the optional perceptual term of the VAE adaptation (weights supplied by the user)
        "lpips": ["lpips>=0.1.4,<0.2"],
        # the live demo, python -m dfm_diffusers.app (gradio 6.31 needs pillow < 13)
        "app": ["gradio>=6.31,<7"],
    },
    license="Apache-2.0",
)
