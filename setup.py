"""Install the qmargin_spk speaker-verification toolkit."""

from setuptools import find_packages, setup

setup(
    name="qmargin_spk",
    version="0.2.0",
    description="Speaker-verification recipes with the Q-Margin family of sparse alpha-divergence losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["qmargin_spk", "qmargin_spk.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # torch.load defaults to weights_only=True
        "torchaudio>=2.1",
        "speechbrain>=1.0,<1.2",
        "soundfile>=0.12",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "kaldiio>=2.18",  # Kaldi data dirs (wav.scp pipes, ark entries) and ark/scp embeddings
    ],
    extras_require={
        # ruff is pinned: what `make lint` accepts (its rules and its formatting) changes between versions.
        "dev": ["pytest>=7", "matplotlib>=3.7", "tensorboard>=2.14", "ruff==0.17.5"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
    },
    entry_points={"console_scripts": ["qmargin-spk=qmargin_spk.cli:main"]},
)
