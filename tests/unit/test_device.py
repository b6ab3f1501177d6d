"""The CPU device layer: CUDA device arguments become CPU, and it stays inert when CUDA exists."""
import threading

import pytest
import torch

from megatron_pz import device


@pytest.fixture(scope="module", autouse=True)
def cpu_layer():
    if torch.cuda.is_available():
        pytest.skip("the CPU device layer is only active without CUDA")
    assert device.install() is True
    assert device.install() is True  # idempotent
    yield
    device.uninstall()  # keep the rest of the test session free of the patches
    assert torch.empty(1).type() == "torch.FloatTensor"


def test_factory_functions_with_cuda_device_land_on_cpu():
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"  # int ordinal


def test_tensor_moves_to_cuda_are_identity_on_cpu():
    t = torch.arange(3.)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.to(torch.device("cuda"), torch.float64).dtype == torch.float64


def test_megatron_grad_type_assertion_passes():
    # clip_grad_by_total_norm_fp32 asserts param.grad.type() == 'torch.cuda.FloatTensor'
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversions untouched


def test_rng_tracker_fork_restores_and_streams_differ():
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 1)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        x = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # outer stream restored
    with tracker.fork("a"):
        y = torch.rand(4)
    assert not torch.equal(x, y)  # the tracked stream advanced


def test_streams_and_events_are_inert():
    s = torch.cuda.Stream(device=torch.cuda.current_device())
    with torch.cuda.stream(s):
        pass
    e = torch.cuda.Event()
    e.record()
    s.wait_event(e)
    torch.cuda.synchronize()


def test_other_threads_get_the_mode_when_they_install():
    seen = {}

    def work():
        device.install()
        seen["dev"] = torch.empty(1, device="cuda").device.type

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["dev"] == "cpu"


def test_install_is_a_noop_with_cuda(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert device.install() is False
