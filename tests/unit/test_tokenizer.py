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
