"""Our SGLang wire format against the pinned SGLang release's own source (read, never imported).

What is checked, and where the truth comes from:
  * every request our client sends (recorded from its real methods) goes to a route that exists in
    ``sglang/srt/entrypoints/http_server.py`` with an allowed method; the request class is the one that route's
    handler is annotated with (so the endpoint -> class map is SGLang's, not ours);
  * every key we send exists in that class (``sglang/srt/managers/io_struct.py``, inherited fields included) with a
    type compatible with the value, and every field without a default is sent;
  * ``sampling_params`` keys against ``SamplingParams`` (``sglang/srt/sampling/sampling_params.py``);
  * the /generate body passes SGLang's generated JSON contract decoder and the embedded server's /generate
    response items decode with it (``sglang/api/v1/api_types.py``, loaded standalone with a 5-line msgspec stub);
  * the flags the launcher passes to ``sglang.launch_server`` are ServerArgs fields
    (``sglang/srt/arg_groups/fields/*.py``), and every endpoint the embedded server serves is an SGLang route.
Skips (with the reason) only when the SGLang source is not present: run ``bash tools/install.sh``.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

NUM_GPUS = 0
REPO = Path(__file__).resolve().parents[2]


def _locate_sglang_src() -> Path | None:
    """The folder containing the ``sglang`` package: $SGLANG_SRC, .cache/sglang-src, or an installed copy."""
    candidates = []
    if os.environ.get("SGLANG_SRC"):
        env = Path(os.environ["SGLANG_SRC"])
        candidates += [env, env.parent]
    candidates.append(REPO / ".cache" / "sglang-src")
    try:
        spec = importlib.util.find_spec("sglang")  # locates without executing sglang/__init__.py
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))).parent)
    for c in candidates:
        if (c / "sglang" / "srt" / "managers" / "io_struct.py").is_file():
            return c
    return None


SRC = _locate_sglang_src()
pytestmark = pytest.mark.skipif(SRC is None, reason="SGLang source not found (set SGLANG_SRC or run "
                                                    "`bash tools/install.sh`, which installs it into .cache/sglang-src)")


# --------------------------------------------------------------------------------------------------------------
# Reading SGLang's source
# --------------------------------------------------------------------------------------------------------------

class Module:
    """Classes (field -> (annotation, has_default), bases) and type aliases of one source file."""

    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text())
        self.classes: dict[str, tuple[dict[str, tuple[ast.expr, bool]], list[str]]] = {}
        self.aliases: dict[str, ast.expr] = {}
        self.docs: dict[str, str] = {}
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef):
                self.docs[node.name] = ast.get_docstring(node) or ""
                fields = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        fields[stmt.target.id] = (stmt.annotation, stmt.value is not None)
                self.classes[node.name] = (fields, [ast.unparse(b) for b in node.bases])
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, (ast.Subscript, ast.Name, ast.BinOp))):
                self.aliases[node.targets[0].id] = node.value

    def fields(self, cls: str) -> dict[str, tuple[ast.expr, bool]]:
        """Fields of ``cls`` including those inherited from bases defined in the same file."""
        own, bases = self.classes[cls]
        out: dict[str, tuple[ast.expr, bool]] = {}
        for base in bases:
            if base in self.classes:
                out.update(self.fields(base))
        out.update(own)
        return out


def _io() -> Module:
    return Module(SRC / "sglang/srt/managers/io_struct.py")


def _routes() -> dict[str, tuple[set[str], str | None]]:
    """path -> (HTTP methods, request class name the handler takes or None), from the FastAPI decorators."""
    tree = ast.parse((SRC / "sglang/srt/entrypoints/http_server.py").read_text())
    io_classes = set(_io().classes)
    routes: dict[str, tuple[set[str], str | None]] = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        cls = None
        for arg in node.args.args:
            if arg.annotation is not None:
                names = {n.id for n in ast.walk(arg.annotation) if isinstance(n, ast.Name)}
                hit = names & io_classes
                if hit:
                    cls = hit.pop()
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"):
                continue
            if not (dec.args and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str)):
                continue  # routes computed at runtime (os.environ.get(...)) are not ours
            kind = dec.func.attr
            if kind == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = {e.value for e in kw["methods"].elts} if "methods" in kw else {"GET"}
            elif kind in ("get", "post", "put", "delete"):
                methods = {kind.upper()}
            else:
                continue
            path = dec.args[0].value
            old_methods, old_cls = routes.get(path, (set(), None))
            routes[path] = (old_methods | methods, cls or old_cls)
    return routes


# --------------------------------------------------------------------------------------------------------------
# JSON value vs Python annotation
# --------------------------------------------------------------------------------------------------------------

def _type_error(value: Any, ann: ast.expr, mod: Module, where: str) -> str | None:
    """None if ``value`` (parsed JSON) can populate a field annotated ``ann``; else why not."""
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):  # string annotation
        return _type_error(value, ast.parse(ann.value, mode="eval").body, mod, where)
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):  # X | Y
        return _union_error(value, [ann.left, ann.right], mod, where)
    if isinstance(ann, ast.Constant) and ann.value is None:
        return None if value is None else f"{where}: {value!r} for None"
    if isinstance(ann, ast.Name):
        name = ann.id
        if name == "Any":
            return None
        if name in mod.aliases:
            return _type_error(value, mod.aliases[name], mod, where)
        if name in mod.classes and "positional array" in mod.docs[name]:  # api_types tuples, e.g. LogprobEntry
            fields = list(mod.fields(name).values())
            if not isinstance(value, list) or len(value) != len(fields):
                return f"{where}: {value!r} is not a {len(fields)}-element array {name}"
            return next((e for i, (v, (a, _)) in enumerate(zip(value, fields))
                         if (e := _type_error(v, a, mod, f"{where}[{i}]"))), None)
        if name in mod.classes:  # a nested JSON object (api_types structs)
            if not isinstance(value, dict):
                return f"{where}: {type(value).__name__} for object {name}"
            fields = mod.fields(name)
            for k, v in value.items():
                if k in fields:
                    err = _type_error(v, fields[k][0], mod, f"{where}.{k}")
                    if err:
                        return err
            return None
        checks = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "bool": lambda v: isinstance(v, bool),
            "bytes": lambda v: isinstance(v, str),  # JSON has no bytes: base64 strings (Base64Bytes)
            "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list),
        }
        if name not in checks:
            return f"{where}: cannot check annotation {name!r} for value {value!r}"
        return None if checks[name](value) else f"{where}: {value!r} is not {name}"
    if isinstance(ann, ast.Subscript):
        head = ast.unparse(ann.value).split(".")[-1]
        args = list(ann.slice.elts) if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if head == "Optional":
            return None if value is None else _type_error(value, args[0], mod, where)
        if head == "Union":
            return _union_error(value, args, mod, where)
        if head == "Annotated":
            return _type_error(value, args[0], mod, where)
        if head in ("List", "list", "Set", "set", "Sequence", "Tuple", "tuple"):
            if not isinstance(value, list):
                return f"{where}: {type(value).__name__} for {ast.unparse(ann)}"
            if head in ("Tuple", "tuple"):
                return None
            for i, v in enumerate(value):
                err = _type_error(v, args[0], mod, f"{where}[{i}]")
                if err:
                    return err
            return None
        if head in ("Dict", "dict", "Mapping"):
            if not isinstance(value, dict):
                return f"{where}: {type(value).__name__} for {ast.unparse(ann)}"
            return next((e for v in value.values() if (e := _type_error(v, args[1], mod, where))), None)
        if head == "Literal":
            allowed = [a.value for a in args if isinstance(a, ast.Constant)]
            return None if value in allowed else f"{where}: {value!r} not in {allowed}"
    return f"{where}: cannot check annotation {ast.unparse(ann)!r}"


def _union_error(value: Any, options: list[ast.expr], mod: Module, where: str) -> str | None:
    errors = [_type_error(value, o, mod, where) for o in options]
    return None if any(e is None for e in errors) else " / ".join(e for e in errors if e)


def _check_payload(payload: dict, cls: str, mod: Module, where: str) -> None:
    fields = mod.fields(cls)
    for key, value in payload.items():
        assert key in fields, f"{where}: we send {key!r}, which {cls} (in {mod.path.name}) does not have"
        err = _type_error(value, fields[key][0], mod, f"{where}.{key}")
        assert err is None, f"{err} (annotation in {cls}: {ast.unparse(fields[key][0])})"
    missing = [k for k, (_, has_default) in fields.items() if not has_default and k not in payload]
    assert not missing, f"{where}: {cls} requires {missing}, which we do not send"


# --------------------------------------------------------------------------------------------------------------
# Recording what the client sends
# --------------------------------------------------------------------------------------------------------------

def _record_client_requests() -> list[tuple[str, str, Any]]:
    from megatron_pz.rollout.protocol import SamplingParams
    from megatron_pz.rollout.sglang_client import SGLangClient

    calls: list[tuple[str, str, Any]] = []
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=20, stop=("\n\n", "</a>"),
                            stop_token_ids=(7,), ignore_eos=True, seed=3, skip_special_tokens=False)

    def fake_request(self, method, endpoint, payload=None, *, timeout_s, retries=None, expect_json=True):
        calls.append((method, endpoint, payload))
        if endpoint == "/generate" and payload.get("logprob_start_len") == 0:  # input_top_logprobs
            return [{"text": "", "output_ids": [9], "meta_info": {
                "input_top_logprobs": [None] + [[[-0.1, 1, None], [-2.5, 2, None]]] * (len(p) - 1)}}
                for p in payload["input_ids"]]
        if endpoint == "/generate":
            return [{"text": "", "output_ids": [9], "meta_info": {
                "finish_reason": {"type": "length", "length": 1}, "weight_version": "1",
                "output_token_logprobs": [[-0.5, 9, None]]}} for _ in range(len(prompts) * params.n)]
        if endpoint == "/get_model_info":
            return {"weight_version": "1"}
        if endpoint == "/get_weights_by_name":
            return [[0.0]]
        return {"success": True, "message": "ok"}

    from megatron_pz.rollout.sglang_client import ClientConfig

    # return_routed_experts: the MoE routing replay request flag rides along on /generate
    client = SGLangClient("http://127.0.0.1:1", ClientConfig(return_routed_experts=True))
    client.request = types.MethodType(fake_request, client)
    # Every public method of the client, with representative arguments.
    client.generate(prompts, params)
    assert client.input_top_logprobs(prompts, 2) == [[[], [-0.1, -2.5], [-0.1, -2.5]], [[], [-0.1, -2.5]]]
    client.weight_version()
    client.update_weights_from_disk("/shared/weights/v00000001", 1)
    client.update_weights_from_tensor(["YmFzZTY0"], "2-partial")
    client.init_weights_update_group("10.0.0.1", 29600, 1, 3, "wug", "nccl")
    client.update_weights_from_distributed(["model.norm.weight"], ["bfloat16"], [[64]], 3, "wug")
    client.destroy_weights_update_group("wug")
    client.get_weights_by_name("model.norm.weight", 4)
    client.flush_cache()
    client.pause_generation("abort")
    client.continue_generation()
    client.release_memory_occupation(["weights", "kv_cache"])
    client.resume_memory_occupation(["weights"])
    return calls


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------

def test_every_request_matches_sglang_request_classes():
    mod, routes = _io(), _routes()
    # Health probes (SGLangClient.health, launcher.wait_healthy) are plain GETs outside request().
    assert "GET" in routes["/health_generate"][0]
    calls = _record_client_requests()
    assert {e for _, e, _ in calls} >= {"/generate", "/update_weights_from_disk", "/update_weights_from_tensor",
                                         "/init_weights_update_group", "/update_weights_from_distributed",
                                         "/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"}
    for method, endpoint, payload in calls:
        assert endpoint in routes, f"SGLang {SRC} has no route {endpoint}"
        methods, cls = routes[endpoint]
        assert method in methods, f"{endpoint} takes {sorted(methods)}, we use {method}"
        if cls is None:  # e.g. /flush_cache (query parameter), /get_model_info
            assert not payload, f"{endpoint} takes no JSON body in SGLang, we send {payload}"
            continue
        _check_payload(payload or {}, cls, mod, f"POST {endpoint}")


def test_sampling_params_keys_exist_in_sglang():
    mod = Module(SRC / "sglang/srt/sampling/sampling_params.py")
    payload = next(p for _, e, p in _record_client_requests() if e == "/generate")["sampling_params"]
    assert {"n", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos",
            "sampling_seed", "skip_special_tokens"} <= set(payload), "exercise every optional key"
    _check_payload(payload, "SamplingParams", mod, "sampling_params")


def _load_api_types():
    """sglang/api/v1/api_types.py standalone: its only dependency is msgspec.Struct, stubbed here."""
    path = SRC / "sglang/api/v1/api_types.py"
    if not path.is_file():
        pytest.skip(f"{path} not in this SGLang release")
    stub = types.ModuleType("msgspec")

    class Struct:
        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__()

        def __init__(self, **kwargs):
            for k, v in kwargs.items():
                object.__setattr__(self, k, v)

    stub.Struct = Struct
    saved = sys.modules.get("msgspec")
    sys.modules["msgspec"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_sglang_api_types_standalone", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("msgspec", None)
        else:
            sys.modules["msgspec"] = saved
    return module, Module(path)


def test_generate_body_passes_sglang_json_contract():
    api, _ = _load_api_types()
    payloads = [p for _, e, p in _record_client_requests() if e == "/generate"]
    assert len(payloads) == 2 and payloads[1]["logprob_start_len"] == 0 and payloads[1]["top_logprobs_num"] == 2
    assert payloads[0]["return_routed_experts"] is True
    for payload in payloads:  # a generation, then the prompts' own top-K log-probs (input_top_logprobs)
        decoded = api.decode_GenerateRequest(payload)  # raises JsonContractError (an HTTP 400 in SGLang)
        assert decoded.input_ids == payload["input_ids"]


def test_embedded_server_responses_decode_with_sglang_contract():
    from megatron_pz.rollout.protocol import GenerationResult
    from megatron_pz.engine.wire import PromptLogprobs, generate_response_item

    api, mod = _load_api_types()
    cases = [
        GenerationResult(0, [5, 6, 2], [-0.1, -0.2, -0.3], "stop", 3, "ab", matched_stop=2),
        GenerationResult(0, [5, 6], [-0.1, -0.2], "stop", 3, "ab", matched_stop="\n\n"),
        GenerationResult(0, [5, 6], [-0.1, -0.2], "length", 3, "ab"),
        GenerationResult(0, [5], [-0.1], "abort", 3, "a"),
    ]
    prompt = PromptLogprobs([7, 8], [None, -0.7], [None, [(-0.5, 8), (-1.2, 3)]])  # logprob_start_len=0, top 2
    for res, with_prompt in [(c, False) for c in cases] + [(cases[0], True)]:
        item = generate_response_item(res, prompt_len=4, return_logprob=True, token_text=lambda t: "x",
                                      prompt=prompt if with_prompt else None)
        decoded = api.decode_GenerateResponse(item)
        meta = decoded.meta_info
        assert [e.token_id for e in meta.output_token_logprobs] == res.response_ids
        assert meta.weight_version == "3"
        kind = {"stop": api.FinishStop, "length": api.FinishLength, "abort": api.FinishAbort}[res.finish_reason]
        assert isinstance(meta.finish_reason, kind), meta.finish_reason
        # Every key we emit is a field SGLang's contract knows (it ignores unknown keys, we add none).
        assert set(item) <= set(mod.fields("GenerateResponse"))
        assert set(item["meta_info"]) <= set(mod.fields("GenerateMetaInfo")), \
            set(item["meta_info"]) - set(mod.fields("GenerateMetaInfo"))
        err = _type_error(item, ast.Name("GenerateResponse"), mod, "response")
        assert err is None, err
        if with_prompt:
            assert [e.token_id for e in meta.input_token_logprobs] == [7, 8]
            assert meta.input_top_logprobs[0] is None and [e.logprob for e in meta.input_top_logprobs[1]] == [-0.5, -1.2]


def test_launcher_flags_are_sglang_server_args():
    from megatron_pz.rollout.launcher import ServerSpec, server_command

    fields_dir = SRC / "sglang/srt/arg_groups/fields"
    if not fields_dir.is_dir():
        pytest.skip(f"{fields_dir} not in this SGLang release")
    known = set()
    for f in fields_dir.glob("*.py"):
        for cls in Module(f).classes.values():
            known |= {"--" + name.replace("_", "-") for name in cls[0]}
    cmd = server_command(ServerSpec(kind="sglang", model_path="/m", port=30000, host="0.0.0.0", api_key="k",
                                    tp_size=2, weight_version=0))
    flags = [a for a in cmd if a.startswith("--")]
    assert flags and set(flags) <= known, f"not SGLang ServerArgs: {set(flags) - known}"
    assert "--enable-return-routed-experts" in known  # the server flag docs/training.md names for routing replay


def test_embedded_server_only_serves_sglang_routes():
    routes = _routes()
    for method, path in _route_table():
        assert path in routes, f"embedded server serves {path}, which SGLang does not"
        assert method in routes[path][0], f"{method} {path}: SGLang allows {sorted(routes[path][0])}"


def _route_table() -> set[tuple[str, str]]:
    """The (method, path) pairs the embedded server serves (a server on an ephemeral port, no engine needed)."""
    from megatron_pz.engine.server import RolloutServer, ServerConfig

    class _NoEngine:
        max_batch_size = 1

    server = RolloutServer(_NoEngine(), ServerConfig(port=0))  # type: ignore[arg-type]
    try:
        return server.routes()
    finally:
        server.close()
