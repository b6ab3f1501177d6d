"""Test tiers: default pytest is CPU-only; ``gpu`` tests need CUDA and are deselected by pytest.ini."""
import os

import pytest

# Keep tests off any accidentally visible accelerator and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
