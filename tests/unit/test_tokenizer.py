"""Tokenizer loading: HF folders, Megatron checkpoints with hf_tokenizer/, SentencePiece files."""
import pytest

from megatron_pz.errors import ConfigError
from megatron_pz.model.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer


def test_sentencepiece_roundtrip(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", eos_id=2, bos_id=1, unk_id=0, pad_id=-1)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 40 and tok.eos_token_id == 2
    ids = tok.encode("the lazy fox")
    assert ids and tok.decode(ids) == "the lazy fox"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) is None
    (tmp_path / "folder").mkdir()
    (tmp_path / "sp.model").rename(tmp_path / "folder" / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path / "folder"), SentencePieceTokenizer)


def test_hf_tokenizer_from_model_folder_and_checkpoint(smollm2):
    hf_dir, mcore_dir = smollm2
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 49152
    text = "Paris is the capital of France."
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user" in chat and chat.rstrip().endswith("<|im_start|>assistant")
    assert load_tokenizer(mcore_dir).encode(text) == tok.encode(text)  # travels with the checkpoint


def test_missing_tokenizer_named(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="unrecognised tokenizer file"):
        load_tokenizer(tmp_path / "x.bin")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot load SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def _fake_checkpoint(root, iteration=5):
    """The files ``checkpoint.resolve`` looks at (no tensors)."""
    iter_dir = root / f"iter_{iteration:07d}"
    iter_dir.mkdir(parents=True)
    (iter_dir / "metadata.json").write_text("{}")
    (iter_dir / ".metadata").write_bytes(b"")
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return iter_dir


def test_model_source_resolves_each_kind_of_load_value(tmp_path):
    from megatron_pz.convert.source import resolve_source

    run = tmp_path / "run"
    iter_dir = _fake_checkpoint(run / "checkpoints")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert (resolve_source(run / "checkpoints").kind, resolve_source(run / "checkpoints").path) == \
        ("mcore", run / "checkpoints")
    assert resolve_source(iter_dir).path == iter_dir
    assert resolve_source(run).path == run / "checkpoints"  # a training run's output folder
    src = resolve_source(hf)
    assert (src.kind, src.path, src.hf_dir) == ("hf", hf, hf)
    with pytest.raises(ConfigError, match=r"policy\.load='.*missing': no such file"):
        resolve_source(tmp_path / "missing", what="policy.load")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--load='.*empty' is not 'smollm2', a Megatron checkpoint"):
        resolve_source(tmp_path / "empty", what="--load")


def test_tokenizer_dir_of_a_checkpoint_a_run_and_an_override(tmp_path):
    from megatron_pz.convert.source import ModelSource, tokenizer_dir

    run = tmp_path / "run"
    root = run / "checkpoints"
    iter_dir = _fake_checkpoint(root)
    src = ModelSource(kind="mcore", path=root)
    assert tokenizer_dir(src) is None
    (run / "hf_meta").mkdir()
    assert tokenizer_dir(src) is None  # a folder without tokenizer files does not count
    (run / "hf_meta" / "tokenizer.json").write_text("{}")
    assert tokenizer_dir(src) == run / "hf_meta"
    assert tokenizer_dir(ModelSource(kind="mcore", path=iter_dir)) == run / "hf_meta"
    (iter_dir / "hf_tokenizer").mkdir()
    (iter_dir / "hf_tokenizer" / "tokenizer_config.json").write_text("{}")
    assert tokenizer_dir(src) == iter_dir / "hf_tokenizer"
    (root / "hf_tokenizer").mkdir()
    (root / "hf_tokenizer" / "tokenizer.model").write_bytes(b"")
    assert tokenizer_dir(src) == root / "hf_tokenizer"  # the checkpoint's own files win
    assert tokenizer_dir(src, override=tmp_path / "tok") == tmp_path / "tok"
    hf = ModelSource(kind="hf", path=tmp_path / "hf", hf_dir=tmp_path / "hf")
    assert tokenizer_dir(hf) == tmp_path / "hf"
