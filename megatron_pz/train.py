"""The PretrainZero step loop [PZ §3.3, §4.1]: ``train(cfg)`` and its stage verbs. The command line is
``train_cli.py`` (``megatron-pz train --config FILE [key=value ...]``, ``torchrun -m megatron_pz.train ...``).

One step:

    rollout   paragraphs -> generator rollouts -> masks -> predictor rollouts -> rewards -> advantages
              (trainer/rollout_source.py: corpus, engine, the batch generated ahead while the last step trained)
    train     micro-batches -> Megatron forward/backward (vocab-parallel log-probs, GRPO loss on the last
              PP stage) -> finalize_model_grads -> distributed optimizer + cosine schedule
    sync      gather TP/PP shards into HF tensors -> rollout engine at weight version + 1 (weight_sync/publisher.py)
    save      Megatron checkpoint: model, optimizer, scheduler, corpus positions, RNG, step, weight version
              (trainer/checkpointer.py owns the list); with checkpoint.async_save the shards are written in the
              background and the checkpoint is published during the next step, once written (publish_saves)
    evaluate  every eval.interval steps: the eval suites through the rollout engine, which now serves the
              new weights (rank 0; also once before the first step when eval.at_start)
    log       one console line, TensorBoard, metrics.jsonl, sample texts, progress bar (rank 0); then the step's
              checkpoint is published (the tracker names it only once the step's lines are written)

Every stage takes the frozen run (trainer/run.py) built once by trainer/setup.py.

A rollout server the trainer launched (rollout.backend=embedded) that dies is restarted with the current weights and
the step's rollout or sync retried, up to rollout.max_engine_restarts times (trainer/connect.py Engine.recover).

The same command resumes a killed run from <output_dir>/checkpoints. It stops early, after a checkpoint and with
exit status 0, on SIGUSR1/SIGTERM or when another step would pass ``train.exit_duration_mins`` (trainer/deadline.py).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # torchrun -m megatron_pz.train ...: the same process goes on as `python -m megatron_pz.train_cli ...`, before
    # anything heavy is imported. The command line's module is light on purpose: multiprocessing helpers that
    # Megatron starts with "spawn" import the main module again, and this one would import Megatron (its warnings
    # on the console, seconds per helper).
    os.execv(sys.executable, [sys.executable, "-m", "megatron_pz.train_cli", *sys.argv[1:]])

import copy  # noqa: E402 (the imports of the loop itself)
import logging  # noqa: E402

import torch
from megatron.core import parallel_state as ps

from megatron_pz.config import RunConfig
from megatron_pz.errors import RolloutError
from megatron_pz.eval.runner import evaluate as run_suites
from megatron_pz.eval.runner import flat_metrics
from megatron_pz.logs import StepTimer, paragraph_ids, reduce_step, sample_histograms
from megatron_pz.parallel import is_rank0
from megatron_pz.trainer.batching import MicroBatch, build_microbatches, seq_multiple
from megatron_pz.trainer.connect import SERVING_MEMORY, WEIGHTS_MEMORY
from megatron_pz.trainer.deadline import Deadline, any_rank
from megatron_pz.train_flops import executed_flops
from megatron_pz.trainer.run import Run
from megatron_pz.trainer.setup import setup, shutdown
from megatron_pz.trainer.step import forward_logprobs, train_step
from megatron_pz.types import Sample, Status

logger = logging.getLogger("megatron_pz.train")


def train(cfg: RunConfig) -> None:
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
                train_metrics = update_policy(run, done, samples)
            publish_saves(run, timer)
            with phase(timer, done, "rollout_wait"):
                rollout_metrics.update(finish_prefetch(run))
            with phase(timer, done, "sync"):
                sync_weights(run)
            out_of_time = done < cfg.train.steps and deadline.no_room_for_another_step(timer.summary()["time/step"])
            stop = any_rank(run.stop.requested or out_of_time)  # the save is collective: all ranks stop or none
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
    if run.stop.requested:
        logger.warning("stopping after step %d on request (checkpoint saved)", step)
        return
    run.logger.info(f"stop     after step {step} of {run.cfg.train.steps}: another step could pass "
                    f"train.exit_duration_mins={run.cfg.train.exit_duration_mins:g} "
                    f"({deadline.elapsed_s / 60:.1f} min used); checkpoint saved, the same command continues")


# ------------------------------------------------------------------ stages
def rollout(run: Run, step: int) -> tuple[list[Sample], dict[str, float]]:
    """This rank's samples for ``step`` (``RolloutSource.batch``: collected, or generated while the previous step
    trained; every rank of a model-parallel group gets its data owner's)."""
    return run.rollout.batch(step)


def prefetch(run: Run, step: int) -> None:
    """``rollout.max_staleness`` > 0: start collecting ``step``'s batch in the background (data owners)."""
    run.rollout.prefetch(step)


def finish_prefetch(run: Run) -> dict[str, float]:
    """Wait for the batch in flight before the weight sync (every batch comes from one weight version)."""
    return run.rollout.wait()


def microbatches_for(run: Run, samples: list[Sample]) -> list[MicroBatch]:
    """This run's micro-batches: sequence length padded so TP sequence parallelism and CP can split it, and one
    length for all micro-batches under pipeline parallelism (fixed-shape p2p activations); shared-prompt rows
    with ``train.shared_prompt``, packed rows with ``train.max_tokens_per_microbatch``."""
    p = run.cfg.parallel
    # MoE routing replay: every micro-batch carries the engine's experts, layers x top-k per token
    width = run.arch.num_layers * run.arch.moe_router_topk if run.cfg.model.moe_routing_replay else None
    return build_microbatches(samples, run.cfg.train.micro_batch_size, run.tokenizer.eos_token_id or 0,
                              seq_multiple=seq_multiple(p.tensor_model_parallel_size, p.sequence_parallel,
                                                        p.context_parallel_size),
                              same_length=p.pipeline_model_parallel_size > 1,
                              shared_prompt=run.cfg.train.shared_prompt,
                              max_tokens=run.cfg.train.max_tokens_per_microbatch, routing_width=width,
                              attention=run.cfg.row_attention_on())


def update_policy(run: Run, step: int, samples: list[Sample]) -> dict[str, float]:
    """One GRPO update on this DP rank's samples (Megatron's pipeline schedule + distributed optimizer). A step
    with NaN/Inf in its loss or gradients is skipped on every rank; ``train.max_nonfinite_steps`` of them in a row
    stop the run (TrainingError) before this step's save."""
    run.rollout.engine.release_memory()  # SGLang on the trainer's GPUs (rollout.release_memory_in_train)
    microbatches = microbatches_for(run, samples)
    # sft_span: teacher-forced cross-entropy at temperature 1 (the model's own distribution), no rollout to match.
    supervised = run.cfg.train.objective_spec.supervised
    temperature = 1.0 if supervised else run.cfg.rollout.temperature
    metrics = train_step(run.training, microbatches, run.cfg.loss, run.arch.vocab_size, temperature,
                         supervised=supervised)
    metrics["train/microbatches"] = float(len(microbatches))
    run.nonfinite.record(step, metrics["train/nonfinite_skipped"] > 0)  # every rank: the flag was all-reduced
    if not ps.is_pipeline_last_stage():  # loss metrics exist on the last stage only
        metrics = {k: v for k, v in metrics.items()
                   if k in ("train/grad_norm", "train/lr", "train/update_skipped", "train/nonfinite_skipped")}
    metrics["train/flops"] = executed_flops(run.chunks, run.arch, microbatches)
    return metrics


def check_on_policy(run: Run, samples: list[Sample]) -> dict[str, float]:
    """First step of a process: trainer log-probs vs the rollout engine's on every generated response token.

    The PPO ratio pi_trainer / pi_rollout should be 1 on-policy; this reports how far it is (one extra
    forward pass, once). Filtered samples are included, so the check runs even when DAPO drops everything.
    """
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
    state = run.weights.export(run.chunks)  # collective
    engine = run.rollout.engine
    error = None
    try:
        engine.resume_memory(WEIGHTS_MEMORY)  # released for the train phase: back before they are written
        run.weights.publish(state)
        engine.resume_memory(SERVING_MEMORY)
    except RolloutError as exc:
        error = exc
    run.rollout.recover(error, f"weight sync to version {run.weight_version}")


def should_save(run: Run, step: int, stop: bool = False) -> bool:
    return run.checkpointer.due(step, stop)


def save(run: Run, step: int, last: bool = False) -> None:
    """Everything the checkpointer's parts hold: model, optimizer, scheduler, weight version, corpus positions and
    the batch in flight, RNG, step. With ``checkpoint.async_save`` the shards are written in the background, except
    for the ``last`` save of the process (the end of the run or a stop), which waits for its write."""
    run.checkpointer.save(step, last=last)


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
    """The eval suites and lm-evaluation-harness tasks (``eval.harness``, on the pool's server) on the weights the
    rollout engine serves now; rank 0 only (the others return {}).

    Greedy by default, so the numbers move only when the weights do. Returns ``eval/<suite or task>/<metric>``.
    """
    if not is_rank0() or not run.is_data_owner:
        return {}
    e = run.cfg.eval
    results = run_suites(run.rollout.pool, run.tokenizer.encode, run.chat_template, e, run.cfg.prompt.style,
                         restate=run.cfg.prompt.pred_restate, cloze=run.cfg.prompt.pred_cloze)
    if e.harness:
        from megatron_pz.eval.harness import evaluate_harness

        results.update(evaluate_harness(run.rollout.pool, run.tokenizer, e.harness, e.harness_include, e.limit,
                                        e.seed))
    return flat_metrics(results)


def log_eval(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Eval metrics outside a training step (the initial weights): one metrics line at ``step``, rank 0."""
    if metrics and is_rank0():
        run.logger.log_step(step, {**metrics, "weight_version": float(run.weight_version)})


def log(run: Run, step: int, samples: list[Sample], metrics: dict[str, float]) -> None:
    """Reduce this step's metrics and sample statistics to rank 0 (``logs.reduce_step``) and write them."""
    owner_samples = samples if run.is_data_owner else []
    rank0 = is_rank0()
    gathered = [None] * torch.distributed.get_world_size() if rank0 else None
    torch.distributed.gather_object((metrics, owner_samples), gathered, dst=0)
    if not rank0:
        return
    extra = {"weight_version": float(run.weight_version), **run.rollout.metrics()}
    sync = run.weights.last_report
    if sync is not None:
        extra["time/sync_s_per_100m_params"] = sync.seconds_per_100m_params
    scalars, all_samples = reduce_step(gathered, extra)
    run.logger.log_step(step, scalars, sample_histograms(all_samples))
    run.logger.log_data_order(step, paragraph_ids(all_samples))
    k = run.cfg.logging.sample_interval
    if k and step % k == 0:
        run.logger.log_samples(step, all_samples, run.cfg.logging.samples_per_log)

