"""A tiny random Llama with a byte-level tokenizer, saved as an HF folder: the model of rollout tests and quick benches.

Byte-level means every string round-trips through token ids, so stop strings and text output are exercised
without downloading a tokenizer. Vocabulary: 256 bytes + <pad> <bos> <eos> <unk> = 260 ids.

A test fixture, so it lives beside the tests, not in the package: tests import it as ``tiny_llama`` (pytest puts
tests/ on ``sys.path`` for tests/conftest.py, which builds the ``tiny`` fixture with it); tools/bench_rollout.py
adds tests/ to ``sys.path`` itself.
"""
from __future__ import annotations

from pathlib import Path

import torch


def make_byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the 256 byte-level symbols plus four special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<pad>", "<bos>", "<eos>", "<unk>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_tiny_llama(dst: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    max_positions: int = 1024, tie_word_embeddings: bool = False) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` + tokenizer into ``dst`` (created) and return the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init is near-uniform over 260 tokens; widen the logits so samples and greedy paths differ visibly.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not tie_word_embeddings else model.model.embed_tokens.weight.mul_(4.0)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def perturbed_state(src: str | Path, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """The HF state of ``src`` with Gaussian noise (``scale`` x each tensor's std) added to every float tensor."""
    from megatron_pz.engine.weights import read_safetensors_dir

    gen = torch.Generator().manual_seed(seed)
    state = read_safetensors_dir(src)
    out = {}
    for name, t in sorted(state.items()):
        if t.dtype.is_floating_point:
            std = float(t.float().std()) if t.numel() > 1 else 1.0
            t = t + scale * max(std, 1e-3) * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        out[name] = t.contiguous()
    return out


def load_hf(path: str | Path, state: dict[str, torch.Tensor] | None = None):
    """An fp32 HF causal LM from ``path`` in eval mode, optionally with ``state`` loaded over its weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def reference_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the response tokens from one plain forward pass over prompt + response.

    The independent reference the engine's reported log-probs are checked against (T=0 means no scaling).
    """
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0, len(prompt) - 1:-1].float()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(list(response))[:, None]).squeeze(1)


def reference_fn(model):
    """``reference_logprobs`` as the ``(prompt, response, temperature) -> list[float]`` callable that
    ``rollout.weight_sync.check_logprobs`` takes."""
    return lambda prompt, response, temperature: reference_logprobs(model, prompt, response, temperature).tolist()
