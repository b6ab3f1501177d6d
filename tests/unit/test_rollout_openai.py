"""The embedded server's OpenAI-compatible endpoints (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``)
on a tiny random Llama: what lm-evaluation-harness reads from them equals what the engine computes, and they share
``/generate``'s checks, limits and API key."""
from __future__ import annotations

import math

import pytest
import requests
import torch

from megatron_pz.engine.engine import EmbeddedEngine
from megatron_pz.engine.server import RolloutServer, ServerConfig

# tests/tiny_llama.py: pytest puts tests/ on sys.path, as for conftest
from tiny_llama import load_hf

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and tiny come from tests/conftest.py

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def server(tiny):
    srv = RolloutServer(EmbeddedEngine(tiny, max_batch_size=8),
                        ServerConfig(port=0, api_key=KEY, max_n=4, max_prompt_tokens=200)).start()
    yield srv
    srv.stop()


def post(server, path: str, body: dict, headers: dict | None = AUTH) -> requests.Response:
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def prompt(server) -> list[int]:
    return server.engine.tokenizer.encode("Hello world")  # one token per byte (tests/tiny_llama.py)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_are_the_prompt_logprobs(server, tiny, prompt, max_tokens):
    """lm-eval's log-likelihood request: echo=true, logprobs=1, max_tokens 1 (or 0). token_logprobs of the prompt
    positions equal the engine's prompt_logprobs and a plain HF forward pass; top_logprobs hold the top-1 and the
    chosen token; text_offset indexes the echoed text."""
    out = ok(server, "/v1/completions", {"model": "m", "prompt": [prompt], "max_tokens": max_tokens, "echo": True,
                                         "logprobs": 1, "temperature": 0, "seed": 1234})
    assert out["object"] == "text_completion" and out["model"] == "m" and len(out["choices"]) == 1
    choice = out["choices"][0]
    lp = choice["logprobs"]
    n = len(prompt) + max_tokens
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    engine = server.engine.prompt_logprobs([prompt], 1)[0]
    with torch.no_grad():
        ref = torch.log_softmax(load_hf(tiny)(torch.tensor([prompt])).logits[0].float(), -1)
    for t in range(1, len(prompt)):
        got = lp["token_logprobs"][t]
        assert got == pytest.approx(engine.token_logprobs[t], abs=1e-5)
        assert got == pytest.approx(float(ref[t - 1, prompt[t]]), abs=1e-4)
        top = lp["top_logprobs"][t]
        assert max(top.values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)
        assert top[lp["tokens"][t]] == got  # the chosen token is always listed
        assert len(top) <= 2
    text = choice["text"]
    assert text.startswith("Hello world") and lp["tokens"][:len(prompt)] == list("Hello world")
    assert [text[o] for o in lp["text_offset"][:len(prompt)]] == list("Hello world")
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(prompt), "total_tokens": n, "completion_tokens": max_tokens,
                            "prompt_tokens_details": None, "reasoning_tokens": 0, "completion_tokens_details": None}
    if max_tokens == 1:  # lm-eval's own parser on this answer (it drops the generated token): the continuation's sum
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        (total, greedy), = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[6])
        assert total == pytest.approx(sum(engine.token_logprobs[6:]), abs=1e-4)
        argmax = ref[5:-1].argmax(-1).tolist()
        assert greedy == (argmax == prompt[6:])


def test_greedy_and_seeded_completions_equal_generate(server, prompt):
    """The same prompt and sampling through /v1/completions and /generate: the same tokens and text."""
    for sampling, extra in (({"temperature": 0}, {}), ({"temperature": 0.9, "top_p": 0.95, "sampling_seed": 7},
                                                       {"seed": 7})):
        native = requests.post(server.url + "/generate", headers=AUTH, timeout=60, json={
            "input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True, "n": 2, **sampling}})
        assert native.status_code == 200, native.text
        body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True, "n": 2, "return_token_ids": True,
                **{k: v for k, v in sampling.items() if k != "sampling_seed"}, **extra}
        out = ok(server, "/v1/completions", body)
        assert [c["index"] for c in out["choices"]] == [0, 1]
        for c, ref in zip(out["choices"], native.json()):
            assert c["token_ids"] == ref["output_ids"] and c["text"] == ref["text"] and c["prompt_token_ids"] == prompt
            assert c["finish_reason"] == "length" and c["logprobs"] is None
        assert out["usage"]["prompt_tokens"] == len(prompt) and out["usage"]["completion_tokens"] == 16


def test_text_prompts_logprobs_and_choice_order(server):
    """A list of text prompts with n=2: prompt-major choices; completion log-probs (no echo) are the raw log-probs
    of prompt + completion at the completion's positions."""
    out = ok(server, "/v1/completions", {"prompt": ["abc", "xyz!"], "n": 2, "max_tokens": 3, "temperature": 0,
                                         "ignore_eos": True, "logprobs": 2, "return_token_ids": True})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    tok = server.engine.tokenizer
    for i, c in enumerate(out["choices"]):
        prompt = tok.encode(["abc", "xyz!"][i // 2])
        assert c["prompt_token_ids"] == prompt
        rows = server.engine.prompt_logprobs([prompt + c["token_ids"]], 2)[0]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(rows.token_logprobs[len(prompt):], abs=1e-5)
        assert all(2 <= len(top) <= 3 for top in c["logprobs"]["top_logprobs"])
        assert c["logprobs"]["text_offset"][0] == 0
    assert out["usage"]["prompt_tokens"] == len(tok.encode("abc")) + len(tok.encode("xyz!"))


def test_stop_strings_cut_the_text(server, prompt):
    greedy = ok(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                            "return_token_ids": True})["choices"][0]
    text, ids = greedy["text"], greedy["token_ids"]
    tok = server.engine.tokenizer
    k = next(k for k in range(2, len(ids)) if (c := tok.decode([ids[k]])).isascii() and c.strip()
             and c not in tok.decode(ids[:k]))
    stop = tok.decode([ids[k]])
    out = ok(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                         "stop": [stop, "\u2603"], "return_token_ids": True})["choices"][0]
    assert out["finish_reason"] == "stop" and out["matched_stop"] == stop
    assert out["text"] == text[:text.index(stop)] and stop not in out["text"]
    assert out["token_ids"] == ids[:k + 1]  # the stop token is generated, only the text is cut (SGLang)


def test_chat_applies_the_template(server):
    tok = server.engine.tokenizer
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    tok.chat_template = TEMPLATE
    try:
        out = ok(server, "/v1/chat/completions", body)
    finally:
        tok.chat_template = None
    rendered = "<system>Be brief.\n<user>Hi there\n<assistant>"
    plain = ok(server, "/v1/completions", {"prompt": rendered, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert out["object"] == "chat.completion" and out["usage"]["prompt_tokens"] == len(tok.encode(rendered))
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": plain["choices"][0]["text"], "reasoning_content": None}
    content = choice["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
        assert isinstance(entry["bytes"], list) and math.isfinite(entry["logprob"])


def test_models_lists_the_served_model(server):
    r = requests.get(server.url + "/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    card, = r.json()["data"]
    assert card["id"] == server.engine.model_path and card["max_model_len"] == 1024 and card["object"] == "model"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": []}), ("/v1/models", None)])
def test_no_key_is_401(server, path, body):
    r = (requests.get(server.url + path, timeout=30) if body is None else post(server, path, body, headers=None))
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    r = post(server, path, body or {}, headers={"Authorization": "Bearer wrong"}) if body is not None else \
        requests.get(server.url + path, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": "a", "max_tokens": "3"}, "invalid request: max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "a", "temperature": [1]}, "invalid request: temperature:"),
    ("/v1/completions", {"prompt": "a", "echo": "true"}, "invalid request: echo:"),
    ("/v1/completions", {"prompt": [1, "a"]}, "invalid request: prompt must be a string"),
    ("/v1/completions", {"max_tokens": 3}, "invalid request: prompt: Field required"),
    ("/v1/completions", {"prompt": "a", "stream": True}, "stream=true is not supported"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of=3 is not supported"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix='b' is not supported"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty=0.5 is not supported"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens must be positive"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "n": 5}, "n=5 exceeds this server's limit of 4"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, "seed must be an integer in [0, 2**63)"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs must be in [0, 20]"),
    ("/v1/completions", {"prompt": [[1] * 201]}, "prompt[0]: 201 tokens exceed this server's limit of 200"),
    ("/v1/completions", {"prompt": [[300]]}, "prompt 0 has token ids outside [0, 260)"),
    ("/v1/completions", {"prompt": [1] * 100, "max_tokens": 1000}, "exceeds the model's max_position_embeddings"),
    ("/v1/chat/completions", {"messages": "hi"}, "invalid request: messages:"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools="),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs needs logprobs=true"),
])
def test_bad_bodies_are_400_naming_the_field(server, path, body, message):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_bad_chat_messages_are_400(server):
    tok = server.engine.tokenizer
    tok.chat_template = TEMPLATE
    try:
        for messages, message in (([{"role": "robot", "content": "x"}], "messages[0].role must be one of"),
                                  ([{"role": "user", "content": [{"type": "image_url"}]}],
                                   "messages[0].content[0]: only text parts"),
                                  ([{"role": "user", "content": 3}], "messages[0].content must be"),
                                  ([], "messages must not be empty")):
            r = post(server, "/v1/chat/completions", {"messages": messages})
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    finally:
        tok.chat_template = None
