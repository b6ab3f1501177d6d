"""A step with NaN or Inf in its loss or gradients: every rank agrees to skip it, even when only one rank saw the
NaN (``trainer/step._all_finite``, one all-reduce), and ``train.max_nonfinite_steps`` skips in a row stop the run
(``NonFiniteSteps``). tests/e2e/test_nonfinite_e2e.py runs the whole path."""
import pytest
import torch

from megatron_pz.errors import TrainingError
from megatron_pz.parallel import spawn_local
from megatron_pz.trainer.step import NonFiniteSteps, _all_finite

pytestmark = pytest.mark.multiproc


def _worker(out: str) -> None:
    torch.distributed.init_process_group("gloo")  # spawn_local sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = torch.distributed.get_rank()
    model = [torch.nn.Linear(3, 2)]
    for p in model[0].parameters():
        p.grad = torch.ones_like(p)
    verdicts = [_all_finite(model, [{"pg_loss": 0.5, "_tokens": 4}])]  # all finite
    if rank == 1:
        model[0].weight.grad[0, 1] = float("nan")  # one element, one rank
    verdicts.append(_all_finite(model, [{"pg_loss": 0.5}]))
    model[0].weight.grad.fill_(1.0)
    verdicts.append(_all_finite(model, [{"pg_loss": float("inf") if rank == 0 else 0.5}]))  # a loss, rank 0
    p = model[0].bias
    del p.grad
    p.main_grad = torch.full((2,), float("-inf") if rank == 1 else 0.0)  # Megatron DDP's buffer, not .grad
    verdicts.append(_all_finite(model, []))
    torch.save(verdicts, f"{out}/verdicts.{rank}.pt")
    torch.distributed.destroy_process_group()


def test_every_rank_skips_when_one_rank_sees_a_nonfinite_value(tmp_path):
    spawn_local(_worker, 2, (str(tmp_path),))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"verdicts.{rank}.pt") == [True, False, False, False]


def test_max_nonfinite_steps_in_a_row_stop_the_run():
    guard = NonFiniteSteps(3)
    for step, skipped in [(1, True), (2, True), (3, False), (4, True), (5, True)]:
        guard.record(step, skipped)  # never 3 in a row: a finite step resets the count
    with pytest.raises(TrainingError, match=r"steps 4-6 all had NaN or Inf .*train\.max_nonfinite_steps=3"):
        guard.record(6, True)
