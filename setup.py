"""mmspec-jax: speculative decoding for multimodal LLMs (LLaVA-1.5) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name='mmspec-jax',
    version='0.1.0',
    description='Speculative decoding for LLaVA-1.5 with small drafts, in JAX/Flax, for TPU and GPU',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    # configs/ ships inside the package (mmspec_jax.configs): every command finds its default
    # config from any directory.
    packages=find_packages(include=['mmspec_jax', 'mmspec_jax.*']) + ['mmspec_jax.configs'],
    package_dir={'mmspec_jax.configs': 'configs'},
    entry_points={'console_scripts': [
        'mmspec-decode = mmspec_jax.commands.decode:command',
        'mmspec-serve = mmspec_jax.commands.serve:command',
        'mmspec-train = mmspec_jax.commands.train:command',
        'mmspec-convert = mmspec_jax.convert.__main__:command',
        'mmspec-plan = mmspec_jax.plan.memory:command',
        'mmspec-evaluate = mmspec_jax.evaluation.__main__:command',
        'mmspec-bench = mmspec_jax.bench.__main__:command',
        'mmspec-demo = mmspec_jax.demo.pipeline:command',
        'mmspec-target-answers = mmspec_jax.distillation.target_answers:command',
    ]},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.6',
        'flax>=0.10',
        'optax>=0.2',
        'orbax-checkpoint>=0.11',
        'transformers>=5.0',
        'tokenizers>=0.21',
        'safetensors>=0.5',
        'tensorflow-datasets>=4.9',
        'grain>=0.2.12',  # The input pipeline: index shuffle, read-ahead, worker processes.
        'tensorflow-cpu>=2.18',
        'ml-collections>=1.0',
        'tensorboard>=2.15',  # Training summaries (flax.metrics.tensorboard).
        'tqdm>=4.60',
        'matplotlib>=3.7',  # The evaluation's plots.
        'absl-py>=2.0',
        'numpy>=1.26',
        'pillow>=10.0',
        # serve.py: the OpenAI-compatible HTTP layer and its metrics.
        'fastapi>=0.110',
        'uvicorn>=0.29',
        'prometheus_client>=0.20',
        'huggingface_hub>=0.20',  # Hub ids (org/name) as target and draft, through the HF cache.
    ],
    extras_require={
        # The torch reference for parity tests. Pinned: an unpinned torch pulls a CUDA build.
        # pytest-xdist: `make test` runs the test files on 2 workers.
        # openai: the server is tested with the real client.
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'scipy>=1.10', 'torch==2.13.0', 'openai>=1.0'],
        'tpu': ['jax[tpu]'],
        'cuda': ['jax[cuda12]'],
    },
)
