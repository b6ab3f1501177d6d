"""Run config: YAML + base inheritance + overrides, and clear errors before any work starts."""
import re

import pytest

from megatron_pz.config import load_config
from megatron_pz.errors import ConfigError
from megatron_pz.model.arch import ModelArch
from megatron_pz.trainer.setup import validate_lengths


def write(path, text):
    path.write_text(text)
    return path


def test_quickstart_loads_with_paper_defaults_elsewhere():
    c = load_config("examples/quickstart_cpu.yaml")
    assert (c.train.paragraphs_per_step, c.train.masks_per_paragraph, c.train.predictions_per_mask) == (4, 4, 4)
    assert (c.loss.eps_low, c.loss.eps_high, c.loss.kl, c.loss.tis_cap) == (0.2, 0.28, None, 2.0)
    assert c.advantage.dapo_filter and c.reward.zero_acc_rule and c.span.max_occurrences == 8
    d = load_config(None)  # paper scale by default [PZ §4.1]
    assert (d.train.paragraphs_per_step, d.train.masks_per_paragraph, d.train.predictions_per_mask) == (32, 8, 8)
    assert (d.optim.lr, d.optim.lr_decay_style, d.train.steps, d.corpus.max_prompt_tokens,
            d.train.max_response_tokens) == (5e-7, "cosine", 2000, 1536, 4096)


def test_variant_changes_one_thing_via_base(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  steps: 7\n  micro_batch_size: 2\noptim:\n  lr: 1.0e-6\n")
    var = write(tmp_path / "var.yaml", "base: base.yaml\ntrain:\n  objective: random_span\n")
    c = load_config(var)
    assert (c.train.objective, c.train.steps, c.train.micro_batch_size, c.optim.lr) == ("random_span", 7, 2, 1e-6)
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(loop)


def test_overrides_are_typed_yaml_scalars():
    c = load_config(None, ["train.steps=3", "rollout.urls=[http://a:1, http://b:2]", "loss.kl=k3",
                           "loss.kl_coef=0.01", "policy.tokenizer=null"])
    assert c.train.steps == 3 and c.rollout.urls == ["http://a:1", "http://b:2"]
    assert c.loss.kl == "k3" and c.loss.kl_coef == 0.01 and c.policy.tokenizer is None


@pytest.mark.parametrize("override,match", [
    (["train.stpes=3"], r"unknown key 'train\.stpes' \(did you mean 'steps'\?\)"),
    (["train.steps=three"], r"'train\.steps' = 'three' has the wrong type"),
    (["loss.eps_low=1.5"], r"eps_low"),
    (["rollout.backend=vllm"], r"rollout\.backend must be embedded or sglang"),
    (["rollout.weight_sync=distributed"], r"embedded supports only rollout\.weight_sync=disk"),
    (["train.predictions_per_mask=1"], r"group of one sample"),
    (["optim.lr_decay_style=step"], r"lr_decay_style"),
    (["train.shared_prompt_attention=flash"], r"train\.shared_prompt_attention must be auto, dense or segments, "
                                               r"got 'flash'"),
    (["rollout.embedded_dtype=float8"], r"rollout\.embedded_dtype must be fp32, bf16 or fp16"),
    (["rollout.colocate=true", "rollout.backend=sglang"], r"rollout\.colocate=true .* not external servers"),
    (["rollout.max_staleness=-1"], r"rollout\.max_staleness must be >= 0"),
    (["rollout.max_staleness=1", "rollout.colocate=true", "model.dtype=fp32"],
     r"rollout\.max_staleness > 0 .* colocated engine"),
    (["rollout.colocate=true"], r"rollout\.embedded_dtype \(fp32\) must equal model\.dtype \(bf16\)"),
    (["parallel.tensor_model_parallel_size=0"], r"tensor_model_parallel_size must be a positive integer"),
    (["train"], r"not of the form key\.sub=value"),
    (["train.steps.x=1"], r"'train\.steps' = \{'x': 1\} has the wrong type"),
    # a section that validates itself under its class name is reported under the key the user sets
    (["eval.suites=[wiki_spam]"], r"overrides: eval\.suites.*wiki_spam"),
    (["eval.interval=-1"], r"overrides: eval\.interval=-1: expected an int >= 0"),
    (["corpus.on_bad_line=warn"], r"overrides: corpus\.on_bad_line='warn'"),
    (["optim.lr=.inf"], r"'optim\.lr' = inf must be a finite number"),
    (["loss.eps_high=.nan"], r"'loss\.eps_high' = nan must be a finite number"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"bad2\.yaml.*'train' must be a mapping"):
        load_config(write(tmp_path / "bad2.yaml", "train: 3\n"))


@pytest.mark.parametrize("text,position,reason", [
    ("train:\n  steps: 3\n   seed: 1\n", "3:8", "mapping values are not allowed here"),
    ("train:\n\tsteps: 3\n", "2:1", (r"found character '\\t' that cannot start any token \(indent with spaces, "
                                       r"not tabs\)")),
    ("optim:\n  lr: [1e-6\n", "3:1", (r"expected ',' or '\]', but got '<stream end>' \(while parsing a flow sequence "
                                      r"from line 2, column 7\)")),
    ("name: 'run\n", "2:1", r"found unexpected end of stream \(while scanning a quoted scalar from line 1, column 7\)"),
])
def test_yaml_syntax_errors_are_one_line_with_file_line_column(tmp_path, text, position, reason):
    """Not PyYAML's multi-line dump with a caret: the file, 1-based line:column as an editor shows, the reason."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "run.yaml", text))
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'run.yaml'))}:{position}: not valid YAML: {reason}", message)
    with pytest.raises(ConfigError, match=r"^override 'rollout\.urls=\[a, b': cannot parse the value: expected ',' or "
                                          r"'\]', but got '<stream end>' \(while parsing a flow sequence from line 1, "
                                          r"column 1\)$"):
        load_config(None, ["rollout.urls=[a, b"])


def test_a_key_twice_in_one_mapping_is_refused_where_yaml_would_keep_the_last(tmp_path):
    """A second `optim:` section would otherwise drop every value of the first without a word."""
    text = "optim:\n  lr: 1e-6\ntrain:\n  steps: 3\noptim:\n  min_lr: 1e-7\n"
    with pytest.raises(ConfigError, match=r"run\.yaml:5:1: not valid YAML: key 'optim' appears twice in one mapping "
                                          r"\(first at line 1\); keep one$"):
        load_config(write(tmp_path / "run.yaml", text))
    merged = write(tmp_path / "merge.yaml", "train: &t {steps: 3, seed: 5}\ntrain_again:\n  <<: *t\n  steps: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'train_again'"):  # a merge key may be overridden: no repeat
        load_config(merged)


def test_files_that_are_not_run_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is a directory; give a \.yaml file"):
        load_config(tmp_path)
    (tmp_path / "run.yaml").write_bytes(b"\xff\xfeoptim: {}")
    with pytest.raises(ConfigError, match=r"run\.yaml is not UTF-8 text \(byte 0\)"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml: 'base' = 3 must be the path of another run file"):
        load_config(write(tmp_path / "b.yaml", "base: 3\n"))
    with pytest.raises(ConfigError, match=r"k\.yaml: key 1 in 'train' is not a name"):
        load_config(write(tmp_path / "k.yaml", "train:\n  1: 2\n"))


def test_override_into_a_scalar_of_a_file(tmp_path):
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        load_config(write(tmp_path / "r.yaml", "train:\n  steps: 5\n"), ["train.steps.x=1"])


def test_batch_must_split_over_data_parallel():
    c = load_config(None, ["train.paragraphs_per_step=6", "parallel.tensor_model_parallel_size=2"])
    assert c.validate_world(6) == 3
    with pytest.raises(ConfigError, match=r"paragraphs_per_step=6 is not divisible by the data-parallel size 4"):
        c.validate_world(8)
    with pytest.raises(ConfigError, match="world size 7 is not divisible"):
        c.validate_world(7)


def test_prompt_plus_response_must_fit_the_context():
    arch = ModelArch(family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                     num_query_groups=2, head_dim=4, vocab_size=10, max_position_embeddings=2048)
    validate_lengths(load_config(None, ["corpus.max_prompt_tokens=1024", "train.max_response_tokens=1024"]), arch)
    with pytest.raises(ConfigError, match=r"max_prompt_tokens \(1536.* the longest response cap \(4096\) = 5632 "
                                          r"exceeds the model's context of 2048 tokens"):
        validate_lengths(load_config(None), arch)


def test_scientific_notation_is_a_float_where_the_field_is_a_float(tmp_path):
    """YAML 1.1 reads 5e-5 (no dot) as a string; a float field takes it as the number, from a file or the CLI."""
    c = load_config(None, ["optim.lr=5e-5", "optim.min_lr=1E-6", "loss.kl=k3", "loss.kl_coef=2e-3", "optim.adam_eps=1e-8"])
    assert (c.optim.lr, c.optim.min_lr, c.loss.kl_coef, c.optim.adam_eps) == (5e-5, 1e-6, 2e-3, 1e-8)
    assert all(isinstance(x, float) for x in (c.optim.lr, c.optim.min_lr, c.loss.kl_coef))
    f = load_config(write(tmp_path / "r.yaml", "optim:\n  lr: 5e-5\n  weight_decay: 0\n"))
    assert f.optim.lr == 5e-5 and isinstance(f.optim.weight_decay, float)
    assert load_config(None, ["optim.lr=.5e-4"]).optim.lr == 5e-5
    for typed, value in (("1e-6", 1e-6), ("5e-7", 5e-7), ("1E-4", 1e-4), (".5", 0.5), ("+2e-6", 2e-6), ("3", 3.0)):
        lr = load_config(None, [f"optim.lr={typed}"]).optim.lr
        assert lr == value and type(lr) is float, typed
    with pytest.raises(ConfigError, match=r"'optim\.lr' = 'fast' has the wrong type \(expected float, a number such "
                                          r"as 5e-7 or 0\.01\)"):
        load_config(None, ["optim.lr=fast"])
    for bad in ("optim.lr=nan", "optim.lr=inf", "optim.lr=5e-5x", "train.steps=1e3"):
        with pytest.raises(ConfigError, match="has the wrong type"):
            load_config(None, [bad])
    assert load_config(None, ["rollout.api_key=1e5"]).rollout.api_key == "1e5"  # a str field keeps its text


def test_rollout_weights_dtype(monkeypatch):
    """What is pushed to the rollout servers, apart from the embedded engine's own compute dtype."""
    from megatron_pz import device

    sglang = ["rollout.backend=sglang", "rollout.weight_sync=distributed"]
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert load_config(None, sglang).rollout.weights_dtype == "bf16"  # GPU default for SGLang servers
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert load_config(None, sglang).rollout.weights_dtype == "fp32"
    # embedded: the engine computes in embedded_dtype, so by default it is pushed what it computes in
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    r = load_config(None, ["rollout.embedded_dtype=bfloat16"]).rollout
    assert (r.embedded_dtype, r.weights_dtype) == ("bf16", "bf16")
    assert load_config(None).rollout.weights_dtype == "fp32"
    r = load_config(None, [*sglang, "rollout.weights_dtype=float16", "rollout.embedded_dtype=fp32"]).rollout
    assert (r.weights_dtype, r.embedded_dtype) == ("fp16", "fp32")
    with pytest.raises(ConfigError, match=r"rollout\.weights_dtype must be fp32, bf16 or fp16 .*'int8'"):
        load_config(None, ["rollout.weights_dtype=int8"])


def test_a_moved_key_names_its_new_place(tmp_path):
    with pytest.raises(ConfigError, match=r"'task\.objective' is now 'train\.objective'"):
        load_config(write(tmp_path / "old.yaml", "task:\n  objective: random_span\n"))
    with pytest.raises(ConfigError, match=r"'task\.pred_group_size' is now 'train\.predictions_per_mask'"):
        load_config(None, ["task.pred_group_size=8"])


def test_describe_is_the_set_up_in_a_few_lines():
    c = load_config("examples/quickstart_cpu.yaml", ["parallel.tensor_model_parallel_size=2"])
    lines = c.describe(4)
    assert len(lines) == 3 and all(len(line) < 120 for line in lines)
    assert lines[0].startswith("model    smollm2 (fp32)")
    assert "4 processes: TP 2 x PP 1 x CP 1 x DP 2; rollout embedded, disk weight sync in fp32" in lines[1]
    assert lines[2] == "run      pretrainzero, 3 steps of 4 paragraphs x 4 masks x 4 predictions"


def test_colocated_rollout_shares_at_world_size_one_and_copies_with_model_parallelism():
    c = load_config(None, ["rollout.colocate=true", "model.dtype=fp32", "train.paragraphs_per_step=2"])
    assert c.validate_world(1) == 1
    assert "rollout embedded, colocated, weights shared with the trainer" in c.describe(1)[1]
    mp = load_config(None, ["rollout.colocate=true", "model.dtype=fp32", "train.paragraphs_per_step=2",
                            "parallel.tensor_model_parallel_size=2"])
    assert mp.validate_world(4) == 2
    assert "TP 2 x PP 1 x CP 1 x DP 2; rollout embedded, colocated on rank 0, weights copied in memory" in \
        mp.describe(4)[1]


def _old_resolution(cfg, te):
    """What loading plus setup's in-place writes used to leave in (shared_prompt, drop_if_contains)."""
    drop = cfg.corpus.drop_if_contains
    if cfg.train.objective in ("pretrainzero", "random_span", "sft_span") and cfg.span.mask_token not in drop:
        drop = [*drop, cfg.span.mask_token]
    shared = cfg.train.shared_prompt
    if shared is None:
        shared = not (cfg.parallel.context_parallel_size > 1 or cfg.train.objective == "sft_span"
                      or cfg.model.moe_routing_replay or te)
    return shared, drop


@pytest.mark.parametrize("overrides", [
    [], ["span.mask_token=<M>"], ["span.mask_token=<M>", "corpus.drop_if_contains=[<M>]"],
    ["train.objective=rpt", "span.mask_token=<M>"], ["train.objective=sft_span", "span.mask_token=<M>"],
    ["train.objective=random_span"], ["train.shared_prompt=false"], ["train.shared_prompt=true"],
    ["parallel.context_parallel_size=2"], ["model.moe_routing_replay=true"]])
@pytest.mark.parametrize("te", [False, True])
def test_resolved_is_a_new_config_with_the_derived_values_and_the_loaded_one_unchanged(overrides, te):
    cfg = load_config(None, overrides)
    before = cfg.to_dict()
    out = cfg.resolved(transformer_engine=te)
    assert cfg.to_dict() == before  # validation and resolution leave the loaded config as it was
    assert out is not cfg and out.train is not cfg.train and out.corpus is not cfg.corpus
    assert (out.train.shared_prompt, out.corpus.drop_if_contains) == _old_resolution(cfg, te)
    changed = {k for k, v in out.to_dict().items() if v != before[k]}
    assert changed <= {"train", "corpus"}
    assert out.resolved(transformer_engine=te).to_dict() == out.to_dict()  # resolving twice changes nothing


@pytest.mark.parametrize("value,te,expected", [
    ("auto", False, "segments"), ("auto", True, "dense"), ("dense", False, "dense"), ("segments", True, "segments")])
def test_shared_prompt_attention_resolves(value, te, expected):
    """auto: the segment attention with Megatron's local spec (measured faster), TE's own attention with TE."""
    cfg = load_config(None, [f"train.shared_prompt_attention={value}"])
    assert cfg.row_attention_on(te) == expected
    assert cfg.resolved(transformer_engine=te).train.shared_prompt_attention == expected
