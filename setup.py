"""megatron_pz: PretrainZero (reinforcement active pretraining) on Megatron-Core.

Install order matters on CPU-only machines: install ``torch==2.13.0`` first (a CPU wheel),
so that no dependency pulls a multi-GB CUDA torch. ``tools/install.sh`` does exactly that.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_pz",
    version="0.1.0",
    description="PretrainZero: reinforcement active pretraining on Megatron-Core with SGLang rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_pz", "megatron_pz.*"]),
    include_package_data=True,
    package_data={"megatron_pz": ["assets/*", "assets/**/*"]},
    install_requires=[
        # torch is deliberately unpinned here: clusters bring their own CUDA build (NGC containers);
        # CPU machines pin torch==2.13.0 in tools/install.sh before installing this package.
        "torch>=2.6",
        # Tested: 0.16.1 (the newest for Python 3.11) and 0.19.2 (0.17+ need Python >= 3.12); tools/install.sh
        # picks by interpreter. Version differences live in megatron_pz/mcore_compat.py.
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.57",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "numpy>=1.26",
        "pyyaml>=6",
        "requests>=2.31",
        # The embedded rollout server (megatron_pz/engine/server.py) serves like SGLang: FastAPI on uvicorn.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.5",
        "pyarrow>=14",
        "tqdm>=4.66",
        # Maths answers are checked with Math-Verify (eval/answers.py); its LaTeX parser needs the ANTLR runtime
        # it names as an extra.
        "math-verify[antlr4_13_2]>=0.9,<0.10",
    ],
    extras_require={
        # No dependency on the PyPI package called `apex`: it is an unrelated web toolkit. NVIDIA apex
        # ships in NGC containers; Megatron-Core falls back to torch kernels without it.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "sglang": ["sglang[all]>=0.5.6", "sglang-router>=0.2"],
        # `python -m benchmarks.compare` (the top-level benchmarks/ folder, not installed): TRL's GRPOTrainer is
        # the baseline it measures against. Pinned to the version the bench was written and measured with
        # (trl/trainer/grpo_trainer.py internals are overridden in benchmarks/trl_grpo.py).
        "bench": ["trl==1.16.0"],
        # `megatron-pz eval --harness TASKS`: lm-evaluation-harness against a rollout server's OpenAI endpoints.
        # Its API models (local-completions) also need what its [api] extra lists, less tiktoken (OpenAI's own
        # tokenizer; ours is the policy's HF one): aiohttp and tenacity (requests and tqdm come with lm-eval).
        "eval": ["lm-eval>=0.4.9,<0.5", "aiohttp", "tenacity"],
        "dev": [
            "pytest>=8",
            "import-linter>=2.6",  # 2.6 added the acyclic_siblings contract (.importlinter)
            "hypothesis>=6.100",
            "gguf>=0.10",
            "accelerate>=1.0",
            "matplotlib>=3.8",
            # logging.wandb's writer is tested against W&B's offline run files (tests/unit/test_logs_wandb.py).
            "wandb>=0.19",
        ],
    },
    entry_points={"console_scripts": ["megatron-pz=megatron_pz.cli:main"]},
)
