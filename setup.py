"""memrecall: compressed-memory long-context reasoning in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="memrecall",
    version="0.1.0",
    description="Compressed-memory long-context reasoning (compressor, gate, reasoner, RL) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["memrecall", "memrecall.*"]),
    # Lower bounds admit the target GPU image's preinstalled stack (jax 0.11.2,
    # flax 0.12.10, optax 0.2.8, orbax-checkpoint 0.12.4, chex 0.1.92).
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12.10",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        # TensorBoard event files, as MaxText writes them (pure Python; protobuf comes with orbax).
        "tensorboardX>=2.6",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
    ],
    extras_require={
        # tokenizer.json (tokenizers) and chat templates (jinja2); safetensors are read natively.
        "hf": ["tokenizers>=0.19", "jinja2>=3.1"],
        # TFDS builders (array_record, no TensorFlow needed).
        "data": ["tensorflow-datasets>=4.9", "array-record>=0.5", "importlib_resources>=5"],
        # MemAgent's RL data file (hotpotqa_train_32k.parquet) for `rows:` data.
        "parquet": ["pyarrow>=14"],
        # The test suite; `safetensors` and `tensorboard` serve as independent references there;
        # libtpu (jax[tpu]) and jax's CUDA plugin (jax[cuda12-local]) so that
        # tests/test_compile.py and tests/test_model.py compile for a TPU and a GPU in CI.
        "test": ["pytest>=8", "pytest-xdist>=3", "safetensors>=0.4", "tokenizers>=0.19",
                 "jinja2>=3.1", "matplotlib>=3.8", "pyarrow>=14", "tensorboard>=2.14",
                 "jax[tpu]; sys_platform == 'linux'",
                 "jax[cuda12-local]; sys_platform == 'linux'"],
        # The TPU compiler (libtpu, the version jax pins) for launch/compile.py's deviceless
        # compile, no TPU needed.  On a host with no accelerator the launchers then choose the
        # CPU themselves (launch/cli.py: choose_platform), so libtpu's probe stays silent.
        "tpu": ["jax[tpu]; sys_platform == 'linux'"],
        # XLA's GPU compiler (jax's CUDA plugin at jax's version, without the CUDA libraries:
        # about 200 MB) for launch/compile.py's deviceless GPU compile, no GPU or driver needed.
        "gpu-aot": ["jax[cuda12-local]; sys_platform == 'linux'"],
        # PNG plots of evaluations and the demo.
        "plot": ["matplotlib>=3.8"],
    },
)
