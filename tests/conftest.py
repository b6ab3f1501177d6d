"""Test tiers: default pytest is CPU-only; ``gpu`` tests need CUDA and are deselected by pytest.ini."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keep tests off any accidentally visible accelerator and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every test session starts from a cold model cache, as CI on a fresh machine does: a warm
# ~/.cache/megatron_pz once hid a bug in the first-use SmolLM2 conversion (it left a process group and an
# exported MASTER_PORT behind, and every later subprocess died with EADDRINUSE). Subprocesses inherit it.
# Set MEGATRON_PZ_CACHE yourself to reuse a cache between sessions (~30 s saved).
_OWN_CACHE = None
if "MEGATRON_PZ_CACHE" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="megatron_pz_test_cache_")
    os.environ["MEGATRON_PZ_CACHE"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing is a set-up error reported elsewhere
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


# ----------------------------------------------------------------------------- model fixtures
def save_tiny_hf(folder, family: str = "qwen3", seed: int = 0, **overrides):
    """A tiny random HF model (fp32) saved with save_pretrained; returns the folder path as str."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[family]
    # vocab 300 is deliberately not a multiple of 128: Megatron pads it (384 at TP1, 512 at TP2).
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen3":
        kw["head_dim"] = 24  # Qwen3's explicit head_dim != hidden/heads
    kw.update(overrides)
    torch.manual_seed(seed)
    model_cls(cfg_cls(**kw)).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_qwen3_hf(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny_qwen3") / "hf", "qwen3")


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny_llama") / "hf", "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2():
    """(hf_dir, mcore_dir) of SmolLM2-135M-Instruct, converted once and cached (~25 s the first time)."""
    from megatron_pz.convert.smollm2 import prepare_smollm2

    hf_dir, mcore_dir = prepare_smollm2()
    return str(hf_dir), str(mcore_dir)


def save_tiny_policy(folder, smollm2_hf_dir) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: a policy for real entry points."""
    import shutil

    d = save_tiny_hf(folder, "llama", vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=1024)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(smollm2_hf_dir) / f, d)
    return d


@pytest.fixture(scope="session")
def tiny_policy(smollm2, tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy") / "hf", smollm2[0])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and 2 threads on 2 shared cores spin badly under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte tokenizer (tests/tiny_llama.py), saved as an HF folder."""
    from tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")
