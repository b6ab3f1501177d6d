"""CPU device layer: lets Megatron-Core's CUDA-only code paths run on a machine without CUDA.

Megatron-Core assumes CUDA in a handful of places that matter for us:

* ``torch.cuda.current_device()`` used as the ``device=`` of buffers (global memory buffer, p2p
  pipeline communication, RNG tracker), and literal ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")``;
* the model-parallel RNG tracker (``tensor_parallel.random``) saving/restoring the CUDA generator;
* ``torch.cuda.Stream`` / ``Event`` / ``stream()`` in DDP's communication overlap;
* ``clip_grad_by_total_norm_fp32`` asserting ``param.grad.type() == 'torch.cuda.FloatTensor'``;
* the MoE all-to-all dispatcher turning its split sizes into host arrays only for CUDA tensors;
* ``torch.compile``/TE fused kernels (those are switched off through ``TransformerConfig`` by the
  model provider, not here).

``install()`` patches exactly these, and nothing when CUDA is available: on a GPU machine it is a no-op
and returns False. It is idempotent. The patches are process-wide (the device-mapping
``TorchFunctionMode`` is per thread: it is pushed on the thread that calls ``install()``, which is the
training thread; call ``install()`` again from any other thread that builds or runs Megatron modules).

Why a ``TorchFunctionMode``: device placement is decided in dozens of Megatron call sites; intercepting
the ``device`` argument of every torch call is smaller and more robust than patching each call site.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_lock = threading.Lock()
_thread_state = threading.local()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device training tensors live on: the current CUDA device, or CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int device (e.g. torch.cuda.current_device()) means a CUDA ordinal; CPU has none.
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call made under it."""

    _CPU = torch.device("cpu")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = self._CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            # tensor.to("cuda"), tensor.to(0), tensor.to(torch.device("cuda"), dtype)
            args = (args[0], self._CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts grads are 'torch.cuda.FloatTensor'; report CPU tensors under the CUDA name.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream / Event: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_originals: dict[tuple[object, str], object] = {}


def _set(obj: object, name: str, value: object) -> None:
    _originals.setdefault((obj, name), getattr(obj, name, None))
    setattr(obj, name, value)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    _set(cuda, "current_device", lambda: 0)
    _set(cuda, "set_device", lambda *a, **k: None)
    _set(cuda, "synchronize", lambda *a, **k: None)
    _set(cuda, "Stream", _NullStream)
    _set(cuda, "Event", _NullStream)
    _set(cuda, "current_stream", lambda *a, **k: _NullStream())
    _set(cuda, "default_stream", lambda *a, **k: _NullStream())
    _set(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    # The "CUDA" generator is the CPU default generator: the RNG tracker saves, reseeds and restores it,
    # which keeps per-TP-rank dropout streams distinct and reproducible on CPU too.
    _set(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _set(cuda.random, "get_rng_state", cuda.get_rng_state)
    _set(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself (infinite recursion).
    _set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(cuda, "manual_seed_all", lambda seed: None)
    _set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(cuda, "memory_allocated", lambda *a, **k: 0)
    _set(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    _set(cuda, "empty_cache", lambda *a, **k: None)


def _patch_megatron() -> None:
    """Megatron-internal CUDA calls that bypass torch.cuda's public functions."""
    from megatron.core.tensor_parallel import random as mp_random

    _set(mp_random, "_set_cuda_rng_state",
         lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    _set(mp_random, "_get_cuda_rng_state",
         lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    # MoE all-to-all token dispatcher: its split sizes become host (numpy) arrays only when they live on CUDA;
    # on CPU they stay tensors, which all_to_all_single's binding rejects. gloo itself handles the collective.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

    _set(moe_utils, "maybe_move_tensor_to_cpu", _move_to_host)
    _set(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host)


class _DropSharedGeneratorWarning(logging.Filter):
    """On CPU the tracker's "CUDA" generator *is* the CPU generator, so Megatron's check that the CPU RNG
    is untouched inside ``fork()`` always fires; the save/restore itself is still correct."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enter_thread_mode() -> None:
    """Push the CUDA→CPU device mode on the calling thread (once per thread)."""
    if getattr(_thread_state, "mode", None) is None:
        mode = CudaToCpuMode()
        mode.__enter__()
        _thread_state.mode = mode


def install() -> bool:
    """Install the CPU device layer when CUDA is absent. Returns True if it is active."""
    global _installed
    if cuda_available():
        return False
    with _lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_megatron()
            logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropSharedGeneratorWarning())
            _installed = True
    enter_thread_mode()
    return True


def uninstall() -> None:
    """Undo ``install`` (restore patched functions, pop this thread's mode). For tests."""
    global _installed
    with _lock:
        for (obj, name), value in _originals.items():
            setattr(obj, name, value)
        _originals.clear()
        _installed = False
    mode = getattr(_thread_state, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _thread_state.mode = None
