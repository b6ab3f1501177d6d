"""Data side of PretrainZero: paragraph corpus, answer parsers, span rules, prompt templates and task builders.

Everything here is pure Python (no torch, no tokenizer, no Megatron) so it can be unit-tested on CPU.
"""
