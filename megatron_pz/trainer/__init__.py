"""Megatron-side training mechanics: batching, vocab-parallel log-probs, optimizer, the train step."""
