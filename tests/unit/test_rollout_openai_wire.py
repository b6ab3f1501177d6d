"""The embedded server's OpenAI-compatible wire format against the pinned SGLang release's own source.

``sglang/srt/entrypoints/openai/protocol.py`` is parsed (never imported):
  * every field our request models accept (``engine/wire_openai.py``) is a field of SGLang's ``CompletionRequest`` /
    ``ChatCompletionRequest`` (inherited ones included) with the same default, and the fields SGLang requires are
    the ones we require;
  * every key of the embedded server's responses (completion, chat, models) is a field of SGLang's response class
    for that object (``CompletionResponse``, ``CompletionResponseChoice``, ``LogProbs``, ``UsageInfo``, ...), and
    every field SGLang always sends is there.
Skips (with the reason) only when the SGLang source is not present: run ``bash tools/install.sh``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = "sglang/srt/entrypoints/openai/protocol.py"


def _protocol_path() -> Path | None:
    roots = [Path(os.environ["SGLANG_SRC"])] if os.environ.get("SGLANG_SRC") else []
    roots.append(REPO / ".cache" / "sglang-src")
    for root in roots:
        for c in (root, root.parent):
            if (c / PROTOCOL).is_file():
                return c / PROTOCOL
    return None


PATH = _protocol_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="SGLang source not found (set SGLANG_SRC or run "
                                                     "`bash tools/install.sh`, which installs it into .cache/sglang-src)")
MISSING = object()  # a field without a default (required)
FACTORY = object()  # a field whose default comes from default_factory


class Protocol:
    """Classes of protocol.py: field -> default (a Python value, MISSING or FACTORY), and base class names."""

    def __init__(self, path: Path):
        tree = ast.parse(path.read_text())
        self.constants: dict[str, Any] = {}
        self.classes: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    self.constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                fields = {stmt.target.id: self._default(stmt.value) for stmt in node.body
                          if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                          and not stmt.target.id.startswith("_")}
                self.classes[node.name] = (fields, [ast.unparse(b) for b in node.bases])

    def _default(self, value: ast.expr | None) -> Any:
        if value is None:
            return MISSING
        if isinstance(value, ast.Call) and ast.unparse(value.func) == "Field":
            kw = {k.arg: k.value for k in value.keywords}
            if "default_factory" in kw:
                return FACTORY
            value = kw.get("default", value.args[0] if value.args else None)
            if value is None or (isinstance(value, ast.Constant) and value.value is Ellipsis):
                return MISSING
        if isinstance(value, ast.Name) and value.id in self.constants:
            return self.constants[value.id]
        return ast.literal_eval(value)

    def fields(self, name: str) -> dict[str, Any]:
        """Fields of ``name`` including those of its bases defined in protocol.py (subclass wins)."""
        own, bases = self.classes[name]
        out: dict[str, Any] = {}
        for base in bases:
            if base in self.classes:
                out.update(self.fields(base))
        out.update(own)
        return out


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return Protocol(PATH)


@pytest.mark.parametrize("ours, theirs", [("CompletionRequest", "CompletionRequest"),
                                          ("ChatCompletionRequest", "ChatCompletionRequest")])
def test_request_fields_and_defaults_are_sglangs(protocol, ours, theirs):
    from megatron_pz.engine import wire_openai

    model = getattr(wire_openai, ours)
    sglang = protocol.fields(theirs)
    for name, info in model.model_fields.items():
        assert name in sglang, f"{ours}.{name} is not a field of SGLang's {theirs}"
        want = sglang[name]
        if want is MISSING:
            assert info.is_required(), f"{ours}.{name}: SGLang requires it"
        elif want is not FACTORY:
            assert not info.is_required() and info.default == want, \
                f"{ours}.{name} defaults to {info.default!r}, SGLang's to {want!r}"
    required = {n for n, d in sglang.items() if d is MISSING}
    assert required <= set(model.model_fields), f"SGLang requires {required - set(model.model_fields)}"


def test_neutral_values_are_fields(protocol):
    from megatron_pz.engine.wire_openai import NEUTRAL_CHAT, NEUTRAL_COMPLETION

    for neutral, cls in ((NEUTRAL_COMPLETION, "CompletionRequest"), (NEUTRAL_CHAT, "ChatCompletionRequest")):
        assert set(neutral) <= set(protocol.fields(cls)), set(neutral) - set(protocol.fields(cls))


def _check(protocol: Protocol, obj: dict, cls: str, where: str) -> None:
    fields = protocol.fields(cls)
    extra = set(obj) - set(fields)
    assert not extra, f"{where}: keys {extra} are not fields of SGLang's {cls}"
    # A field without a default is always sent by SGLang; ours must send it too.
    missing = {n for n, d in fields.items() if d is MISSING} - set(obj)
    assert not missing, f"{where}: SGLang's {cls} always has {missing}"


@pytest.fixture(scope="module")
def answers(tiny):
    """Real answers of the embedded server on the tiny model: completion (echo + logprobs), chat (logprobs), models."""
    import requests
    import torch

    from megatron_pz.engine.engine import EmbeddedEngine
    from megatron_pz.engine.server import RolloutServer, ServerConfig

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = EmbeddedEngine(tiny, max_batch_size=4)
    engine.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    server = RolloutServer(engine, ServerConfig(port=0)).start()
    try:
        post = lambda path, body: requests.post(server.url + path, json=body, timeout=60).json()  # noqa: E731
        yield {"completion": post("/v1/completions", {"prompt": "abc", "max_tokens": 2, "echo": True, "logprobs": 2,
                                                      "return_token_ids": True}),
               "chat": post("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}],
                                                     "max_tokens": 2, "logprobs": True, "top_logprobs": 2}),
               "models": requests.get(server.url + "/v1/models", timeout=30).json()}
    finally:
        server.stop()
        torch.set_num_threads(before)


def test_responses_are_sglangs_shapes(protocol, answers):
    completion, chat, models = answers["completion"], answers["chat"], answers["models"]
    _check(protocol, completion, "CompletionResponse", "/v1/completions")
    _check(protocol, completion["usage"], "UsageInfo", "/v1/completions usage")
    choice = completion["choices"][0]
    _check(protocol, choice, "CompletionResponseChoice", "/v1/completions choice")
    _check(protocol, choice["logprobs"], "LogProbs", "/v1/completions logprobs")
    assert set(choice["logprobs"]) == set(protocol.fields("LogProbs"))
    _check(protocol, chat, "ChatCompletionResponse", "/v1/chat/completions")
    choice = chat["choices"][0]
    _check(protocol, choice, "ChatCompletionResponseChoice", "/v1/chat/completions choice")
    _check(protocol, choice["message"], "ChatMessage", "/v1/chat/completions message")
    _check(protocol, choice["logprobs"], "ChoiceLogprobs", "/v1/chat/completions logprobs")
    token = choice["logprobs"]["content"][0]
    _check(protocol, token, "ChatCompletionTokenLogprob", "/v1/chat/completions token")
    _check(protocol, token["top_logprobs"][0], "TopLogprob", "/v1/chat/completions top_logprobs")
    _check(protocol, models, "ModelList", "/v1/models")
    _check(protocol, models["data"][0], "ModelCard", "/v1/models card")
    assert completion["object"] == protocol.fields("CompletionResponse")["object"]
    assert chat["object"] == protocol.fields("ChatCompletionResponse")["object"]
