"""examples/bench_cpu.yaml, the bench's workload, is self-contained and resolves to the values it had when it still
inherited the CPU quickstart (``base: quickstart_cpu.yaml``, commit 23c9b97): a change to another run file or to a
default that shapes the workload fails here, not silently in the measured figures."""
import json
from dataclasses import asdict
from pathlib import Path

import yaml

from megatron_pz.config import load_config

BENCH = Path(__file__).resolve().parents[2] / "examples" / "bench_cpu.yaml"

# The old file's resolution (quickstart merged in, then the defaults of megatron_pz/config.py), every field of
# the sections a random-span / PretrainZero bench run reads (eval, rpt and sft are not used by it).
EXPECTED = {
    'advantage.dapo_filter': True, 'advantage.ddof': 0, 'advantage.eps': 1e-06, 'advantage.std_normalize': True,
    'checkpoint.auto_resume': True, 'checkpoint.keep_last': 1, 'checkpoint.save_interval': 0,
    'corpus.drop_if_contains': ['[mask]'], 'corpus.max_prompt_tokens': 256, 'corpus.min_paragraph_tokens': 32,
    'corpus.num_epochs': None, 'corpus.on_bad_line': 'error', 'corpus.paths': [], 'corpus.prompt_margin_tokens': 8,
    'corpus.seed': 0, 'corpus.shuffle': True, 'logging.log_interval': 1, 'logging.progress_bar': False,
    'logging.sample_interval': 0, 'logging.samples_per_log': 2, 'logging.tensorboard': False,
    'loss.entropy_coef': 0.0, 'loss.eps_high': 0.28, 'loss.eps_low': 0.2, 'loss.kl': None, 'loss.kl_coef': 0.0,
    'loss.tis_cap': 2.0, 'model.dtype': 'fp32', 'model.fp8': None, 'model.fp8_amax_compute_algo': 'most_recent',
    'model.fp8_amax_history_len': 1, 'model.fp8_margin': 0, 'model.fp8_recipe': 'delayed',
    'model.moe_aux_loss_coeff': 0.0, 'model.moe_grouped_gemm': None, 'model.moe_router_dtype': None,
    'model.moe_token_dispatcher': 'alltoall', 'model.recompute_granularity': None, 'model.recompute_method': None,
    'model.recompute_num_layers': None, 'model.transformer_impl': 'auto', 'name': 'bench_cpu',
    'optim.adam_beta1': 0.9, 'optim.adam_beta2': 0.999, 'optim.adam_eps': 1e-08, 'optim.clip_grad': 1.0,
    'optim.lr': 1e-06, 'optim.lr_decay_steps': None, 'optim.lr_decay_style': 'cosine', 'optim.lr_warmup_steps': 0,
    'optim.min_lr': 0.0, 'optim.use_distributed_optimizer': True, 'optim.weight_decay': 0.01,
    'output_dir': 'runs/bench_cpu', 'parallel.backend': 'auto', 'parallel.context_parallel_size': 1,
    'parallel.expert_model_parallel_size': 1, 'parallel.expert_tensor_parallel_size': None,
    'parallel.pipeline_model_parallel_size': 1, 'parallel.seed': 1234, 'parallel.sequence_parallel': False,
    'parallel.tensor_model_parallel_size': 1, 'parallel.timeout_minutes': 30, 'policy.allow_pickle': False,
    'policy.load': 'smollm2', 'policy.rope_scaling': None, 'policy.tokenizer': None, 'policy.vocab_size': None,
    'prompt.gen_response_prefix': '', 'prompt.style': 'chat', 'prompt.system_prompt': '',
    'random_span.geometric_p': 0.2, 'random_span.max_tries': 16, 'random_span.max_words': 10,
    'reward.invalid_mask_reward': 0.0, 'reward.next_token_reward': 'rpt_prefix', 'reward.pred_reward': 'exact_match',
    'reward.zero_acc_rule': True, 'rollout.api_key': None, 'rollout.backend': 'embedded', 'rollout.bucket_mb': 512,
    'rollout.embedded_dtype': 'fp32', 'rollout.embedded_max_batch_size': 64, 'rollout.endpoints_file': None,
    'rollout.gen_max_new_tokens': 64, 'rollout.max_concurrency_per_server': 64, 'rollout.max_retries': 3,
    'rollout.pred_max_new_tokens': 48, 'rollout.reproducible': True, 'rollout.router_url': None,
    'rollout.server_tp_size': 1, 'rollout.temperature': 1.0, 'rollout.timeout_s': 600.0, 'rollout.top_p': 1.0,
    'rollout.urls': [], 'rollout.weight_sync': 'disk', 'rollout.weight_sync_backend': 'nccl',
    'rollout.weight_sync_master_address': None, 'rollout.weights_dir': None, 'rollout.weights_dtype': 'fp32',
    'span.mask_token': '[mask]', 'span.max_occurrences': 8, 'span.mode': 'default', 'span.strip_span': True,
    'train.exit_duration_mins': None, 'train.masks_per_paragraph': 2, 'train.max_response_tokens': 128,
    'train.micro_batch_size': 4, 'train.objective': 'random_span', 'train.paragraphs_per_step': 2,
    'train.predictions_per_mask': 4, 'train.seed': 1234, 'train.steps': 3,
}


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_bench_workload_file_inherits_nothing():
    raw = yaml.safe_load(BENCH.read_text())
    assert "base" not in raw


def test_bench_workload_resolves_to_its_pinned_values():
    # through JSON so tuples and lists compare alike, as they were recorded
    got = dict(_flat(json.loads(json.dumps(asdict(load_config(BENCH))))))
    wrong = {k: (got.get(k, "<missing>"), v) for k, v in EXPECTED.items() if got.get(k, "<missing>") != v}
    assert not wrong, f"examples/bench_cpu.yaml resolves differently (key: (now, pinned)): {wrong}"


# ---------------------------------------------------------------- the PretrainZero-shaped workload
BENCH_PZ = BENCH.with_name("bench_pz_cpu.yaml")
# bench_cpu's resolution with the PretrainZero shape: groups of 8 in one shared-prompt micro-batch each, prompts
# capped at 512 tokens from paragraphs of 160 or more, answers of 48 tokens at most.
EXPECTED_PZ = {**EXPECTED, 'name': 'bench_pz_cpu', 'output_dir': 'runs/bench_pz_cpu', 'train.predictions_per_mask': 8,
               'train.micro_batch_size': 8, 'train.shared_prompt': True, 'corpus.max_prompt_tokens': 512,
               'corpus.min_paragraph_tokens': 160, 'train.max_tokens_per_microbatch': None}


def test_pz_bench_workload_file_inherits_nothing_and_resolves_to_its_pinned_values():
    assert "base" not in yaml.safe_load(BENCH_PZ.read_text())
    got = dict(_flat(json.loads(json.dumps(asdict(load_config(BENCH_PZ))))))
    wrong = {k: (got.get(k, "<missing>"), v) for k, v in EXPECTED_PZ.items() if got.get(k, "<missing>") != v}
    assert not wrong, f"examples/bench_pz_cpu.yaml resolves differently (key: (now, pinned)): {wrong}"


def test_pz_bench_computes_a_group_prompt_once_and_fits_the_trl_side():
    """One group of 8 predictions on a 300-token prompt (the workload's prompts are 220-383 tokens) with answers at
    the 48-token cap: the run file's micro-batch holds the whole group in one shared-prompt row, and the FLOPs the
    trainer logs for it (``train.executed_flops``) count the prompt once, not 8 times. TRL's side takes the same
    batch (samples per step a multiple of its micro-batch)."""
    from benchmarks.trl_grpo import GRPOSettings
    from megatron_pz.plan.archs import preset
    from megatron_pz.plan.flops import microbatch_flops
    from megatron_pz.trainer.batching import build_microbatches
    from megatron_pz.types import Sample, Status, Task

    cfg = load_config(BENCH_PZ)
    t = cfg.train
    assert 4 * cfg.pred_max_new_tokens <= cfg.corpus.max_prompt_tokens // 2 <= 8 * cfg.pred_max_new_tokens
    prompt, answer = list(range(1, 301)), cfg.pred_max_new_tokens
    group = [Sample(task=Task.RANDOM_SPAN, group_id="g", prompt_ids=prompt, response_ids=[7] * answer,
                    rollout_logprobs=[-1.0] * answer, status=Status.COMPLETED, advantage=(-1.0) ** i)
             for i in range(t.predictions_per_mask)]
    shared = build_microbatches(group, t.micro_batch_size, shared_prompt=t.shared_prompt)
    unshared = build_microbatches(group, t.micro_batch_size)
    assert [tuple(mb.tokens.shape) for mb in shared] == [(1, 304 + 8 * answer)]  # 300 + 8 x 48, padded to 8
    assert [tuple(mb.tokens.shape) for mb in unshared] == [(8, 352)]
    arch = preset("smollm2-135m")
    ratio = microbatch_flops(arch, 1, 304 + 8 * answer) / microbatch_flops(arch, 8, 352)
    assert ratio < 0.5  # 688 positions against 2816 (x 0.24 through the layers; attention is S^2 per row)
    s = GRPOSettings.from_config(cfg)
    assert s.num_generations == 8 and (t.paragraphs_per_step * t.masks_per_paragraph * 8) % s.micro_batch_size == 0
