"""Ouroboros: Triton kernels, model, training loop and int6 quantizer for the parameter-golf challenge."""
from setuptools import find_packages, setup

setup(
    name="ouroboros",
    version="0.1.0",
    description="Triton-kernel performance stack for the parameter-golf challenge (16 MB, 10 min, 8xH100)",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "model", "model.*", "train", "train.*",
                                    "quant", "quant.*", "bench", "bench.*"]),
    install_requires=[
        # The CUDA build of torch 2.13 pairs with triton 3.7.1: pin both so the interpreter on CPU runs
        # the same Triton front end the H100 runs. Unpinned torch resolves to a multi-GB CUDA build.
        "torch==2.13.0",
        "triton==3.7.1",
        "numpy",
        "sentencepiece",
        # the artifact's compressor and the bundle's (quant/bundle.py): its encoder decides train_gpt.py's bytes
        "brotli==1.2.1",
        # the per-group artifact's "ans" coder (quant/artifact.py): its range coder and categorical models
        "constriction==0.5.0",
        "filelock",
        "tqdm",
        "matplotlib",
        "pytest",
        "pytest-benchmark",
        "pytest-xdist",
        # `python -m quant.records stats` only (its Welch t-test); no run imports it, so it is not in the bundle
        "scipy",
    ],
    extras_require={"download": ["huggingface_hub"]},
)
