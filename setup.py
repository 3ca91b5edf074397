"""gil_jax: gene- and cell-type-incremental learning for single-cell transcriptomics in JAX."""

from setuptools import find_packages, setup

setup(
    name="gil_jax",
    version="0.2.0",
    description="Continual learning on single-cell transcriptomics with JAX/Flax",
    packages=find_packages(include=["gil_jax", "gil_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "anndata>=0.10",
        "numpy>=1.26",
        "scipy>=1.11",
        "pandas>=2.0",
        "chex>=0.1.87",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "h5py>=3.10",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5"],
                    # benchmarks/bench_pipeline.py --grain (the loader before concurrent.futures)
                    "bench": ["grain>=0.2.12"]},
    entry_points={"console_scripts": ["gil-jax=gil_jax.cli:main"]},
)
