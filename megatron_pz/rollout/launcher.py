"""Start rollout servers (SGLang or embedded) as subprocesses, wait until healthy, write the endpoints file.

Shared by ``slurm/launch_sglang.sh`` (one launcher per rollout node) and single-node runs / tests:

    python -m megatron_pz.rollout.launcher --kind sglang --model /ckpt/hf --num-servers 8 --gpus-per-server 1 \
        --base-port 30000 --host 0.0.0.0 --endpoints-file $RUN/endpoints.$SLURM_NODEID.txt -- --mem-fraction-static 0.8

It keeps the ``Popen`` handles and stops exactly the processes it started (SIGTERM, then SIGKILL after a grace
period), never anything found by name. In CLI mode it stays in the foreground until SIGTERM/SIGINT or until a
server dies (then it stops the others and exits non-zero, so Slurm notices).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import requests

from megatron_pz.errors import RolloutError, UserError

logger = logging.getLogger(__name__)

API_KEY_ENV = "MEGATRON_PZ_ROLLOUT_API_KEY"
"""The embedded server's API key travels in this variable, never on its command line (visible in ``ps``)."""


@dataclass
class ServerSpec:
    """How to start one server."""

    kind: Literal["sglang", "embedded"]
    model_path: str
    port: int
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    """Host written into the endpoints file (default: ``host``, or this machine's name when binding 0.0.0.0)."""
    api_key: str | None = None
    weights_dir: str | None = None
    """Embedded only: the folder disk weight updates may read from."""
    gpus: str | None = None
    """CUDA_VISIBLE_DEVICES for this server (e.g. "0,1"); None = inherit."""
    tp_size: int = 1
    """SGLang tensor parallel size (= number of GPUs in ``gpus``)."""
    weight_version: int = 0
    extra_args: list[str] = field(default_factory=list)
    """Appended to the server's command line (e.g. ``--mem-fraction-static 0.8``)."""
    log_path: str | None = None
    die_with_parent: bool = False
    """Linux: the server gets SIGTERM when the process that launched it dies, even by SIGKILL (a trainer that
    owns its embedded server must not leak it when killed). Slurm launchers keep servers independent.
    Caveat: the kernel fires it when the launching *thread* exits, so call ``launch`` from a long-lived thread."""
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        host = self.advertise_host or (socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host)
        return f"http://{host}:{self.port}"


def server_command(spec: ServerSpec) -> list[str]:
    """The argv that starts ``spec`` (flags of ``sglang.launch_server`` or ``megatron-pz serve-rollout``)."""
    if spec.kind == "sglang":
        # Flag names are the ServerArgs fields of sglang/srt/arg_groups/fields/*.py (checked by the wire test).
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model_path, "--host", spec.host,
               "--port", str(spec.port), "--tp-size", str(spec.tp_size), "--weight-version", str(spec.weight_version)]
        if spec.api_key:
            cmd += ["--api-key", spec.api_key]
    elif spec.kind == "embedded":
        cmd = [sys.executable, "-m", "megatron_pz.cli", "serve-rollout", "--model", spec.model_path, "--host",
               spec.host, "--port", str(spec.port), "--weight-version", str(spec.weight_version)]
        if spec.weights_dir:
            cmd += ["--weights-dir", spec.weights_dir]
        # The API key goes through the environment (see launch()), not argv: argv is visible in `ps`.
    else:
        raise UserError(f"unknown server kind {spec.kind!r} (sglang | embedded)")
    return cmd + list(spec.extra_args)


class LaunchedServer:
    """A started server: its spec, process handle and log file."""

    def __init__(self, spec: ServerSpec, proc: subprocess.Popen, log_path: str | None):
        self.spec = spec
        self.proc = proc
        self.log_path = log_path

    @property
    def url(self) -> str:
        return self.spec.url

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return "(no log)"
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM this process (only it), wait ``grace_s``, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit within %.0fs of SIGTERM; killing pid %d", self.url, grace_s,
                               self.proc.pid)
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(spec: ServerSpec) -> LaunchedServer:
    """Spawn one server with its output in ``spec.log_path`` (or inherited stdout/stderr)."""
    env = {**os.environ, **spec.env}
    if spec.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.gpus
    if spec.kind == "embedded":
        env.pop(API_KEY_ENV, None)
        if spec.api_key:
            env[API_KEY_ENV] = spec.api_key
        if spec.cwd:  # run `-m megatron_pz.cli` from a source checkout even if the package is not installed
            env["PYTHONPATH"] = os.pathsep.join(p for p in (spec.cwd, env.get("PYTHONPATH")) if p)
    cmd = server_command(spec)
    log = None
    if spec.log_path:
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(spec.log_path, "ab")
    logger.info("starting %s server on port %d: %s", spec.kind, spec.port,
                " ".join("***" if i and cmd[i - 1] == "--api-key" else a for i, a in enumerate(cmd)))
    try:
        proc = subprocess.Popen(cmd, cwd=spec.cwd, env=env, stdout=log or None, stderr=subprocess.STDOUT if log else None,
                                start_new_session=True,  # Ctrl-C in the launcher's terminal is handled by us
                                preexec_fn=_die_with_parent if spec.die_with_parent else None)
    finally:
        if log:
            log.close()  # the child keeps its own descriptor
    return LaunchedServer(spec, proc, spec.log_path)


def _die_with_parent() -> None:
    """In the child before exec: ask the kernel for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: nothing to do
        pass


def wait_healthy(server: LaunchedServer, timeout_s: float = 900.0, poll_s: float = 1.0) -> None:
    """Poll ``/health_generate`` until 200; RolloutError if the process exits or ``timeout_s`` passes."""
    # The launcher runs on the server's node: probe it locally, whatever name is advertised to other nodes.
    host = server.spec.host
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    url = f"http://{local}:{server.spec.port}/health_generate"
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.alive():
            raise RolloutError(f"{server.spec.kind} server for {server.url} exited with code {server.proc.returncode} "
                               f"before becoming healthy; log {server.log_path}:\n{server.log_tail()}")
        try:
            resp = requests.get(url, timeout=5)
            if resp.status_code == 200:
                logger.info("%s is healthy", server.url)
                return
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(poll_s)
    raise RolloutError(f"{url} not healthy after {timeout_s:.0f}s (last: {last}); log {server.log_path}:\n"
                       f"{server.log_tail()}")


def write_endpoints_file(path: str | Path, urls: Sequence[str]) -> None:
    """One URL per line, written atomically (readers never see a half-written list)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"{u}\n" for u in urls))
    os.replace(tmp, path)


def launch(specs: Sequence[ServerSpec], endpoints_file: str | Path | None = None,
           health_timeout_s: float = 900.0) -> list[LaunchedServer]:
    """Start every server, wait for all to be healthy, write the endpoints file. All-or-nothing."""
    servers: list[LaunchedServer] = []
    try:
        for spec in specs:
            servers.append(start_server(spec))
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            for fut in [pool.submit(wait_healthy, s, health_timeout_s) for s in servers]:
                fut.result()
    except BaseException:
        stop_all(servers)
        raise
    if endpoints_file is not None:
        write_endpoints_file(endpoints_file, [s.url for s in servers])
        logger.info("wrote %d endpoint(s) to %s", len(servers), endpoints_file)
    return servers


def relaunch(server: LaunchedServer, model_path: str, weight_version: int,
             health_timeout_s: float = 900.0) -> LaunchedServer:
    """Start a server that died again, on the same port (its URL stays valid for every client), from
    ``model_path`` at ``weight_version``; wait until it is healthy. The dead process is reaped first (a server that
    is somehow still running is stopped). Raises RolloutError if the new one does not come up (it is stopped)."""
    server.stop(grace_s=10.0)
    new = start_server(replace(server.spec, model_path=model_path, weight_version=weight_version))
    try:
        wait_healthy(new, health_timeout_s)
    except BaseException:
        new.stop(grace_s=10.0)
        raise
    return new


def stop_all(servers: Sequence[LaunchedServer], grace_s: float = 30.0) -> None:
    """Stop the given servers concurrently (each by its own handle)."""
    if not servers:
        return
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(lambda s: s.stop(grace_s), servers))


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g for g in env.split(",") if g]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def build_specs(args: argparse.Namespace) -> list[ServerSpec]:
    gpus = _visible_gpus()
    per = args.gpus_per_server
    if per and len(gpus) < per * args.num_servers:
        raise UserError(f"{args.num_servers} servers x {per} GPUs need {per * args.num_servers} GPUs, "
                        f"{len(gpus)} visible")
    log_dir = Path(args.log_dir)
    host_tag = socket.gethostname()
    return [ServerSpec(
        kind=args.kind, model_path=args.model, port=args.base_port + i, host=args.host,
        advertise_host=args.advertise_host, api_key=args.api_key, weights_dir=args.weights_dir,
        gpus=",".join(gpus[i * per:(i + 1) * per]) if per else None, tp_size=max(1, per),
        weight_version=args.weight_version, extra_args=list(args.server_args),
        log_path=str(log_dir / f"rollout-{host_tag}-{args.base_port + i}.log"),
    ) for i in range(args.num_servers)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m megatron_pz.rollout.launcher", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["sglang", "embedded"], default="sglang")
    p.add_argument("--model", required=True, help="HF model folder (embedded also takes a Megatron checkpoint)")
    p.add_argument("--num-servers", type=int, default=1)
    p.add_argument("--gpus-per-server", type=int, default=0, help="0 = do not set CUDA_VISIBLE_DEVICES")
    p.add_argument("--base-port", type=int, default=30000, help="server i listens on base-port + i")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for other nodes to reach it)")
    p.add_argument("--advertise-host", default=None, help="host written to the endpoints file")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}")
    p.add_argument("--weights-dir", default=None, help="embedded: folder disk weight updates may read from")
    p.add_argument("--weight-version", type=int, default=0)
    p.add_argument("--endpoints-file", required=True, help="written (one URL per line) once all are healthy")
    p.add_argument("--log-dir", default="runs/rollout-logs")
    p.add_argument("--health-timeout", type=float, default=900.0, help="seconds to wait for /health_generate")
    args = p.parse_args(argv)
    args.server_args = server_args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        servers = launch(build_specs(args), args.endpoints_file, args.health_timeout)
    except (RolloutError, UserError) as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return 1
    print(f"launcher: {len(servers)} server(s) healthy; endpoints in {args.endpoints_file}", flush=True)
    code = 0
    while not stop.wait(2.0):
        dead = [s for s in servers if not s.alive()]
        if dead:
            for s in dead:
                print(f"launcher: {s.url} exited with code {s.proc.returncode}; log tail:\n{s.log_tail()}",
                      file=sys.stderr)
            code = 1
            break
    stop_all(servers)
    return code


if __name__ == "__main__":
    sys.exit(main())
