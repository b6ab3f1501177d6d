"""Moved to ``megatron_pz.convert.export`` (the shared model sources export with it); kept so that
``python -m megatron_pz.eval.export RUN/checkpoints OUT`` still works."""
import sys

from megatron_pz.convert.export import copy_tokenizer, export_hf, main

__all__ = ["copy_tokenizer", "export_hf", "main"]

if __name__ == "__main__":
    sys.exit(main())
