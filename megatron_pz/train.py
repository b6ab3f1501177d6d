"""``megatron-pz train --config FILE [key=value ...]`` or ``megatron-pz train --load CKPT --tokenizer DIR``
(or ``torchrun -m megatron_pz.train ...``).

The PretrainZero step loop [PZ §3.3, §4.1]. One step:

    rollout   paragraphs -> generator rollouts -> masks -> predictor rollouts -> rewards -> advantages
    train     micro-batches -> Megatron forward/backward (vocab-parallel log-probs, GRPO loss on the last
              PP stage) -> finalize_model_grads -> distributed optimizer + cosine schedule
    sync      gather TP/PP shards into HF tensors -> rollout engine at weight version + 1 (weight_sync/publisher.py)
    save      Megatron checkpoint: model, optimizer, scheduler, corpus positions, RNG, step, weight version
              (trainer/checkpointer.py owns the list); with checkpoint.async_save the shards are written in the
              background and the checkpoint is published during the next step, once written (publish_saves)
    evaluate  every eval.interval steps: the eval suites through the rollout engine, which now serves the
              new weights (rank 0; also once before the first step when eval.at_start)
    log       one console line, TensorBoard, metrics.jsonl, sample texts, progress bar (rank 0)

Every stage takes the typed run (trainer/run.py) built once by trainer/setup.py.

A rollout server the trainer launched (rollout.backend=embedded) that dies is restarted with the current weights and
the step's rollout or sync retried, up to rollout.max_engine_restarts times (trainer/connect.py recover_rollout).

The same command resumes a killed run from <output_dir>/checkpoints. It stops early, after a checkpoint and with
exit status 0, on SIGUSR1/SIGTERM or when another step would pass ``train.exit_duration_mins`` (trainer/deadline.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch

from megatron_pz.config import FLAGS, RunConfig, flag_overrides, load_config

if TYPE_CHECKING:
    from megatron_pz.logs import StepTimer
    from megatron_pz.trainer.batching import MicroBatch
    from megatron_pz.trainer.deadline import Deadline
    from megatron_pz.trainer.run import Run
    from megatron_pz.types import Sample

logger = logging.getLogger("megatron_pz.train")


def train(cfg: RunConfig) -> None:
    from megatron_pz.logs import StepTimer
    from megatron_pz.trainer.deadline import Deadline, any_rank
    from megatron_pz.trainer.setup import setup, shutdown

    deadline = Deadline(cfg.train.exit_duration_mins)  # the wall-clock budget counts the set-up too
    run = setup(cfg)
    timer = StepTimer()
    try:
        if should_evaluate(run, run.start_step, at_start=True):
            log_eval(run, run.start_step, evaluate(run))
        for step in range(run.start_step, cfg.train.steps):
            done = step + 1  # steps are numbered by completed count in logs and checkpoints
            timer.reset()
            publish_saves(run, timer)  # here and between phases: the previous checkpoint, once it is written
            with phase(timer, done, "rollout"):
                samples, rollout_metrics = rollout(run, step)
            prefetch(run, step + 1)  # rollout.max_staleness > 0: the next step's rollout runs while this one trains
            if step == run.start_step:
                rollout_metrics.update(check_on_policy(run, samples))
            publish_saves(run, timer)
            with phase(timer, done, "train"):
                train_metrics = update_policy(run, samples)
            publish_saves(run, timer)
            with phase(timer, done, "rollout_wait"):
                rollout_metrics.update(finish_prefetch(run))
            with phase(timer, done, "sync"):
                sync_weights(run)
            out_of_time = done < cfg.train.steps and deadline.no_room_for_another_step(timer.summary()["time/step"])
            stop = any_rank(run.stop_requested or out_of_time)  # the save is collective: all ranks stop or none
            if should_save(run, done, stop):
                with phase(timer, done, "save"):
                    save(run, done, last=stop or done == cfg.train.steps)
            eval_metrics = {}
            if should_evaluate(run, done):
                with phase(timer, done, "eval"):
                    eval_metrics = evaluate(run)
            log(run, done, samples, {**rollout_metrics, **train_metrics, **eval_metrics, **timer.summary(),
                                     **run.checkpointer.timings()})
            publish_checkpoint(run)  # only now: a resume from this step's checkpoint finds its lines written
            times = timer.summary()
            deadline.record(times["time/step"] - times.get("time/save", 0.0),
                            run.checkpointer.save_cost_s(times.get("time/save")))
            if stop:
                announce_stop(run, done, deadline)
                break
        run.checkpointer.close(clean=True)
    finally:
        run.checkpointer.close(clean=False)  # after an error: see Checkpointer.close
        shutdown(run)


def phase(timer: StepTimer, step: int, name: str):
    """Time one phase of a step, and mark its start in the run's log file (where a killed run stopped)."""
    logger.info("step %d: %s", step, name)
    return timer(name)


def announce_stop(run: Run, step: int, deadline: Deadline) -> None:
    """One line on why the run stops early with a checkpoint: a signal, or the wall-clock budget."""
    if run.stop_requested:
        logger.warning("stopping after step %d on request (checkpoint saved)", step)
        return
    if run.logger is not None:
        run.logger.info(f"stop     after step {step} of {run.cfg.train.steps}: another step could pass "
                        f"train.exit_duration_mins={run.cfg.train.exit_duration_mins:g} "
                        f"({deadline.elapsed_s / 60:.1f} min used); checkpoint saved, the same command continues")


# ------------------------------------------------------------------ stages
def rollout(run: Run, step: int) -> tuple[list[Sample], dict[str, float]]:
    """Data owners collect this DP rank's samples (or take the batch generated while the previous step trained);
    every rank of the model-parallel group gets them."""
    from megatron_pz.parallel import share_samples
    from megatron_pz.trainer.connect import recover_rollout
    from megatron_pz.trainer.overlap import collect_batch, mark_staleness, read_batch, take_batch

    batch = None
    if run.is_data_owner:
        batch = take_batch(run, step) or read_batch(run, step)
    while True:  # again, on the same paragraphs and seeds, after a launched server that died is restarted
        error = None
        if batch is not None and batch.samples is None:
            error = collect_batch(run, batch)
        if not recover_rollout(run, error, f"step {step + 1}: rollout"):
            break
        if batch is not None:
            batch.reset()  # every data owner collects again after a restart
    samples, metrics = (batch.samples, batch.metrics) if batch is not None else (None, {})
    if run.cfg.rollout.max_staleness > 0 and samples is not None:
        metrics = {**metrics, **mark_staleness(run, samples)}
    return share_samples(samples), metrics


def prefetch(run: Run, step: int) -> None:
    """``rollout.max_staleness`` > 0: start collecting ``step``'s batch in the background (data owners), while
    the current step trains on the current weights. Nothing after the last step, or on-policy."""
    if run.cfg.rollout.max_staleness > 0 and run.is_data_owner and step < run.cfg.train.steps:
        run.prefetch.submit(run, step)


def finish_prefetch(run: Run) -> dict[str, float]:
    """Wait for the batch in flight before the weight sync: it finishes on the weights it started with, so every
    batch comes from one weight version. Returns ``time/rollout_background`` (the batch's own wall time)."""
    batch = run.prefetch.wait()
    return {"time/rollout_background": batch.seconds} if batch is not None and batch.seconds else {}


def microbatches_for(run: Run, samples: list[Sample]) -> list[MicroBatch]:
    """This run's micro-batches: sequence length padded so TP sequence parallelism and CP can split it, and one
    length for all micro-batches under pipeline parallelism (fixed-shape p2p activations); shared-prompt rows
    with ``train.shared_prompt``, packed rows with ``train.max_tokens_per_microbatch``."""
    from megatron_pz.trainer.batching import build_microbatches

    p = run.cfg.parallel
    multiple = 8 * (p.tensor_model_parallel_size if p.sequence_parallel else 1) * 2 * p.context_parallel_size
    # MoE routing replay: every micro-batch carries the engine's experts, layers x top-k per token
    width = run.arch.num_layers * run.arch.moe_router_topk if run.cfg.model.moe_routing_replay else None
    return build_microbatches(samples, run.cfg.train.micro_batch_size, run.tokenizer.eos_token_id or 0,
                              seq_multiple=multiple, same_length=p.pipeline_model_parallel_size > 1,
                              shared_prompt=run.cfg.train.shared_prompt,
                              max_tokens=run.cfg.train.max_tokens_per_microbatch, routing_width=width)


def update_policy(run: Run, samples: list[Sample]) -> dict[str, float]:
    """One GRPO update on this DP rank's samples (Megatron's pipeline schedule + distributed optimizer)."""
    from megatron.core import parallel_state as ps

    from megatron_pz.trainer.connect import release_rollout_memory
    from megatron_pz.trainer.step import train_step

    release_rollout_memory(run)  # SGLang on the trainer's GPUs (rollout.release_memory_in_train); else nothing
    microbatches = microbatches_for(run, samples)
    # sft_span: teacher-forced cross-entropy at temperature 1 (the model's own distribution), no rollout to match.
    supervised = run.cfg.train.objective_spec.supervised
    temperature = 1.0 if supervised else run.cfg.rollout.temperature
    metrics = train_step(run.training, microbatches, run.cfg.loss, run.arch.vocab_size, temperature,
                         supervised=supervised)
    metrics["train/microbatches"] = float(len(microbatches))
    if not ps.is_pipeline_last_stage():  # loss metrics exist on the last stage only
        metrics = {k: v for k, v in metrics.items() if k in ("train/grad_norm", "train/lr", "train/update_skipped")}
    metrics["train/flops"] = executed_flops(run, microbatches)
    return metrics


def executed_flops(run: Run, microbatches: list[MicroBatch]) -> float:
    """The step's training matmul FLOPs as laid out, summed over the DP replicas (collective over the DP group):
    every row position through the layers (padding included, a shared prompt once per micro-batch), the output
    layer from ``logits_start`` on where the model slices it (``plan.flops.microbatch_flops``). The benchmark's
    train FLOP/s is this over the train time."""
    from megatron.core import parallel_state as ps

    from megatron_pz import device
    from megatron_pz.model.logit_window import slicing_supported
    from megatron_pz.plan.flops import microbatch_flops
    from megatron_pz.trainer.step import logits_start

    sliced = slicing_supported(run.chunks[0].config)
    flops = sum(microbatch_flops(run.arch, *mb.tokens.shape,
                                 logit_positions=mb.tokens.shape[1] - logits_start(mb) if sliced else None)
                for mb in microbatches)
    total = torch.tensor([flops], dtype=torch.float64, device=device.default_device())
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total.item())


def check_on_policy(run: Run, samples: list[Sample]) -> dict[str, float]:
    """First step of a process: trainer log-probs vs the rollout engine's on every generated response token.

    The PPO ratio pi_trainer / pi_rollout should be 1 on-policy; this reports how far it is (one extra
    forward pass, once). Filtered samples are included, so the check runs even when DAPO drops everything.
    """
    import copy

    from megatron.core import parallel_state as ps

    from megatron_pz.trainer.step import forward_logprobs
    from megatron_pz.types import Status

    probe = []
    for s in samples:
        if s.response_ids and s.rollout_logprobs and s.status in (Status.COMPLETED, Status.TRUNCATED, Status.FILTERED):
            c = copy.copy(s)
            c.status, c.advantage = Status.COMPLETED, 0.0
            probe.append(c)
    mbs = microbatches_for(run, probe)
    logps = forward_logprobs(run.training.model, mbs, run.arch.vocab_size, run.cfg.rollout.temperature)
    if not ps.is_pipeline_last_stage() or not probe:
        return {}
    diffs = torch.cat([(lp.cpu() - mb.rollout_logprobs)[mb.loss_mask > 0].abs() for lp, mb in zip(logps, mbs)])
    return {"onpolicy/logprob_abs_diff_max": float(diffs.max()), "onpolicy/logprob_abs_diff_mean": float(diffs.mean()),
            "onpolicy/ratio_max_dev": float((torch.exp(diffs) - 1).max()), "onpolicy/tokens": float(diffs.numel())}


def sync_weights(run: Run) -> None:
    """Push the updated policy to the rollout engine as weight version + 1 (collective gather, rank 0 pushes).

    A launched server that died is restarted from the new version's folder, which holds the pushed weights."""
    from megatron_pz.errors import RolloutError
    from megatron_pz.trainer.connect import SERVING_MEMORY, WEIGHTS_MEMORY, recover_rollout, resume_rollout_memory

    state = run.weights.export(run.chunks)  # collective
    error = None
    try:
        resume_rollout_memory(run, WEIGHTS_MEMORY)  # released for the train phase: back before they are written
        run.weights.publish(state)
        resume_rollout_memory(run, SERVING_MEMORY)
    except RolloutError as exc:
        error = exc
    recover_rollout(run, error, f"weight sync to version {run.weight_version}")


def should_save(run: Run, step: int, stop: bool = False) -> bool:
    return run.checkpointer.due(step, stop)


def save(run: Run, step: int, last: bool = False) -> None:
    """Everything the checkpointer owns: model, optimizer, scheduler, corpus positions, RNG, step, weight version.
    With ``checkpoint.async_save`` the shards are written in the background, except for the ``last`` save of the
    process (the end of the run or a stop), which returns once the checkpoint is published."""
    run.checkpointer.save(run, step, last=last)


def publish_checkpoint(run: Run) -> None:
    """Collective: name the step's synchronous (or last) checkpoint in the tracker, after its log lines."""
    run.checkpointer.publish()


def publish_saves(run: Run, timer: StepTimer) -> None:
    """Between phases: publish the previous step's background checkpoint if every rank's write is done (rename,
    tracker; collective: one all-reduce to ask); timed as this step's save. Nothing to do with synchronous saves.
    Asking between phases, not only at the next save, keeps the tracker at most a phase behind the write."""
    if run.checkpointer.writing:
        with timer("save"):
            run.checkpointer.poll()


def should_evaluate(run: Run, step: int, at_start: bool = False) -> bool:
    """After every ``eval.interval``-th step and the last one; before step 0 of a fresh run when ``at_start``."""
    e = run.cfg.eval
    if e.interval <= 0:
        return False
    if at_start:
        return e.at_start and step == 0
    return step % e.interval == 0 or step == run.cfg.train.steps


def evaluate(run: Run) -> dict[str, float]:
    """The eval suites on the weights the rollout engine serves now; rank 0 only (the others return {}).

    Greedy by default, so the numbers move only when the weights do. Returns ``eval/<suite>/<metric>``.
    """
    from megatron_pz.eval.runner import evaluate as run_suites
    from megatron_pz.eval.runner import flat_metrics

    if torch.distributed.get_rank() != 0 or not run.is_data_owner:
        return {}
    results = run_suites(run.engine, run.tokenizer.encode, run.chat_template, run.cfg.eval, run.cfg.prompt.style,
                         restate=run.cfg.prompt.pred_restate, cloze=run.cfg.prompt.pred_cloze)
    return flat_metrics(results)


def log_eval(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Eval metrics outside a training step (the initial weights): one metrics line at ``step``, rank 0."""
    if metrics and torch.distributed.get_rank() == 0:
        run.logger.log_step(step, {**metrics, "weight_version": float(run.weight_version)})


def log(run: Run, step: int, samples: list[Sample], metrics: dict[str, float]) -> None:
    """Reduce this step's metrics and sample statistics to rank 0 and write them."""
    from megatron_pz.logs import sample_histograms, sample_scalars

    owner_samples = samples if run.is_data_owner else []
    rank0 = torch.distributed.get_rank() == 0
    gathered: list[Any] | None = [None] * torch.distributed.get_world_size() if rank0 else None
    torch.distributed.gather_object((metrics, owner_samples), gathered, dst=0)
    if not rank0:
        return
    all_samples = [s for _, ss in gathered for s in ss]
    merged: dict[str, list[float]] = {}
    for m, _ in gathered:
        for k, v in m.items():
            merged.setdefault(k, []).append(float(v))
    scalars = {k: sum(v) / len(v) for k, v in merged.items()}  # mean over the ranks that report a metric
    scalars.update(sample_scalars(all_samples))
    scalars["weight_version"] = float(run.weight_version)
    if run.engine_restarts:
        scalars["rollout/engine_restarts"] = float(run.engine_restarts)  # so far in this process
    sync = run.weights.last_report
    if sync is not None:
        scalars["time/sync_s_per_100m_params"] = sync.seconds_per_100m_params
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in all_samples)
    scalars["throughput/tokens_per_s"] = tokens / max(scalars.get("time/step", 0.0), 1e-9)
    scalars["data/paragraphs"] = float(len({s.metadata.get("paragraph_id") for s in all_samples}))
    run.logger.log_step(step, scalars, sample_histograms(all_samples))
    run.logger.log_data_order(step, sorted({str(s.metadata.get("paragraph_id")) for s in all_samples}))
    k = run.cfg.logging.sample_interval
    if k and step % k == 0:
        run.logger.log_samples(step, all_samples, run.cfg.logging.samples_per_log)


# ------------------------------------------------------------------ entry points
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run PretrainZero training (resumes from <output_dir>/checkpoints)",
                       description=__doc__.split("\n\n")[0])
    _add_args(p)
    p.set_defaults(func=lambda a: main_from_args(a))


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run file (YAML), e.g. examples/quickstart_cpu.yaml; without it, the paper's "
                   "defaults (megatron_pz/config.py) and --load")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10 optim.lr=1e-6")
    megatron = p.add_argument_group("Megatron-LM flags", "each sets one config key, the same as KEY=VALUE; "
                                    "continue from a checkpoint with: --load CKPT --tokenizer DIR --save OUT")
    for flag in FLAGS:
        megatron.add_argument(*flag.names, dest=flag.dest, metavar=flag.metavar,
                              help=f"= {flag.key}: {flag.help}")


ROLLOUT_FAILED_EXIT = 3
"""Exit status when the rollout servers failed for good (2 is bad input, 1 a bug)."""


def main_from_args(args: argparse.Namespace) -> int:
    import os

    from megatron_pz.errors import ConfigError, RolloutError
    from megatron_pz.logs import configure_console, say

    flags = flag_overrides(vars(args), args.overrides)
    if args.config is None and not any(o.startswith("policy.load=") for o in [*flags, *args.overrides]):
        raise ConfigError("give a run file (--config FILE) or the weights to start from (--load CKPT or "
                          "policy.load=...); nothing else is needed for the paper's defaults")
    if args.config is not None:
        from pathlib import Path

        from megatron_pz.config import read_yaml
        from megatron_pz.trainer.stages import is_staged, run_stages

        data = read_yaml(Path(args.config))
        if is_staged(data):
            return run_stages(Path(args.config), data, [*flags, *args.overrides])
    cfg = load_config(args.config, [*flags, *args.overrides])
    # The console is for people: library chatter goes to the run's log file, rank 0 prints the set-up, one line
    # per step and the progress bar; other ranks print only errors. RANK/WORLD_SIZE: torchrun's (1 process else).
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    log_path = configure_console(cfg.output_dir, rank)
    if rank == 0:
        for line in cfg.describe(world_size):
            say(line)
        say(f"output   {cfg.output_dir} (metrics.jsonl, tensorboard/, checkpoints/; details in {log_path.name})")
    try:
        train(cfg)
    except RolloutError as exc:
        # A server that died (after the client's retries and the pool's fail-over) is not a bug of ours: name it
        # in one line and say how to continue. The step in flight is lost, nothing saved is: checkpoints are
        # written atomically, and the same command resumes from the last one.
        print(f"megatron-pz train: rollout error: {exc}", file=sys.stderr)
        print(f"megatron-pz train: nothing saved is lost: bring the rollout server(s) back and rerun the same "
              f"command to resume from {cfg.output_dir}/checkpoints", file=sys.stderr)
        return ROLLOUT_FAILED_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_pz.train`` / ``torchrun -m megatron_pz.train``."""
    from megatron_pz.errors import UserError

    p = argparse.ArgumentParser(prog="megatron_pz.train", description=__doc__.split("\n\n")[0])
    _add_args(p)
    try:
        return main_from_args(p.parse_intermixed_args(argv))
    except UserError as exc:
        print(f"megatron_pz.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
