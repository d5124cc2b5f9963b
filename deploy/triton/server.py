#!/usr/bin/env python3
"""Start the ``tritonserver`` bundled in ``nvidia-pytriton`` on loopback only, and stop it.

    .venv/bin/python deploy/triton/server.py MODEL_REPOSITORY [--backend-dir DIR] [--http-port N] ...

Library use (``deploy/triton`` on ``sys.path``)::

    from server import start
    with start("/tmp/repo") as server:          # waits for /v2/health/ready
        client = tritonclient.http.InferenceServerClient(server.http_url)

HTTP, gRPC and metrics listen on 127.0.0.1 only, on free ports unless given. The backend folder
defaults to ``build/triton/backends`` (made by ``build_backend.py``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BACKEND_DIR = ROOT / "build" / "triton" / "backends"
HOST = "127.0.0.1"
# Logged at every start on a machine without a CUDA driver; harmless.
CUDA_NOISE = "CudaDriverHelper has not been initialized"


_RUNNING: weakref.WeakSet[Server] = weakref.WeakSet()  # stopped at interpreter exit if still running


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=5)


class ServerError(RuntimeError):
    """tritonserver is missing, exited, or did not become ready; the message has its log tail."""


def tritonserver_paths() -> tuple[Path, Path]:
    """(binary, folder of its bundled libraries) from the installed nvidia-pytriton, without importing it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: .venv/bin/pip install --no-deps nvidia-pytriton==0.7.0")
    package = Path(next(iter(spec.submodule_search_locations)))
    binary = package / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"no tritonserver binary at {binary} (nvidia-pytriton 0.7.0 ships it)")
    return binary, package.parent / "nvidia_pytriton.libs"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class Server:
    """A running tritonserver. ``http_url``/``grpc_url`` are ``host:port``, as tritonclient wants them."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    command: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_errors(self) -> str:
        """The log's error lines (``E<date> ...``), where a model's load failure is told."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(line for line in text.splitlines() if re.match(r"E\d{4} ", line) and CUDA_NOISE not in line)

    def _report(self) -> str:
        errors = self.log_errors()
        return f"log {self.log_path}:\n" + (f"{errors}\n...\n" if errors else "") + self.log_tail(15)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerError(
                    f"tritonserver exited with status {self.process.returncode} before it was ready; {self._report()}"
                )
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not ready within {timeout:g} s; {self._report()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit status."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    model_repository: str | os.PathLike,
    backend_dir: str | os.PathLike | None = None,
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
    model_control_mode: str = "none",
    extra_args: list[str] | tuple[str, ...] = (),
    log_path: str | os.PathLike | None = None,
    log_verbose: int = 0,
    timeout: float = 60.0,
) -> Server:
    """Launch tritonserver on 127.0.0.1 (port 0: a free one) and wait until it is ready.

    With ``model_control_mode="none"`` every model in the repository is loaded at start, and a model
    that fails to load makes the server exit (ServerError with the log's error lines and tail). ``extra_args`` are
    appended to the command line (e.g. ``["--exit-timeout-secs=5"]``). The log goes to
    ``log_path`` (default a temporary file, see ``Server.log_path``).
    """
    binary, libs = tritonserver_paths()
    repository = Path(model_repository).resolve()
    if not repository.is_dir():
        raise ServerError(f"model repository {repository} is not a folder")
    backends = Path(backend_dir).resolve() if backend_dir else DEFAULT_BACKEND_DIR
    if not (backends / "onnxruntime" / "libtriton_onnxruntime.so").is_file():
        raise ServerError(
            f"no onnxruntime backend in {backends}: run .venv/bin/python deploy/triton/build_backend.py first"
        )
    ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
    command = [
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--model-control-mode={model_control_mode}",
        f"--http-address={HOST}",
        f"--http-port={ports[0]}",
        f"--grpc-address={HOST}",
        f"--grpc-port={ports[1]}",
        f"--metrics-address={HOST}",
        f"--metrics-port={ports[2]}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",  # CPU only: no CUDA pinned pool (and no warning about it)
        f"--log-verbose={log_verbose}",
        *extra_args,
    ]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, *ports, log_path=log_path, command=command)
    try:
        _RUNNING.add(server)
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_repository")
    parser.add_argument("--backend-dir", default=None, help=f"default {DEFAULT_BACKEND_DIR}")
    parser.add_argument("--http-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--grpc-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--model-control-mode", default="none", choices=("none", "poll", "explicit"))
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    args, extra = parser.parse_known_args(argv)
    try:
        server = start(
            args.model_repository,
            args.backend_dir,
            args.http_port,
            args.grpc_port,
            args.metrics_port,
            args.model_control_mode,
            extra,
            log_verbose=args.log_verbose,
            timeout=args.timeout,
        )
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"http:    {server.http_url}", flush=True)
    print(f"grpc:    {server.grpc_url}", flush=True)
    print(f"metrics: {server.metrics_url}", flush=True)
    print(f"log:     {server.log_path} (Ctrl-C stops the server)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        with server.log_path.open(errors="replace") as log:  # follow the log until the server exits
            while server.running():
                chunk = log.read()
                if chunk:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)
            sys.stdout.write(log.read())
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            server.stop()
    return server.process.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
