"""A real ``veilnet-controller`` process for tests, the demo and benchmarks, plus veilctl and credentials.

``ControllerProcess`` creates a data directory (CA, server certificate,
SQLite database), serves on the given addresses (optionally inside a network
namespace), issues operator credentials with any role, and runs ``veilctl``.
It always stops the process it started (context manager).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import TIME_SCALE, json_lines, read_log

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stop_process_group(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal a process started with ``start_new_session=True`` and its whole group; SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout * TIME_SCALE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    for candidate in (REPO_ROOT / ".venv" / "bin" / name, BIN / name):
        if candidate.exists():
            return str(candidate)
    return name


class ControllerProcess:
    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", netns: str | None = None,
                 server_names: list[str] | None = None, certificate_lifetime: str = "24h",
                 control_port: int | None = None, bootstrap_port: int | None = None,
                 trust_domain: str = "veilnet.test", serve_args: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.data = self.workdir / "controller"
        self.host = host
        self.netns = netns
        self.server_names = server_names or [host, "localhost"]
        self.certificate_lifetime = certificate_lifetime
        self.control_port = control_port or free_port()
        self.bootstrap_port = bootstrap_port or free_port()
        self.trust_domain = trust_domain
        self.serve_args = serve_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "controller.log"
        self.ca_hash = ""

    # ------------------------------------------------------------------ lifecycle

    @property
    def control_endpoint(self) -> str:
        return f"{self.host}:{self.control_port}"

    @property
    def bootstrap_endpoint(self) -> str:
        return f"{self.host}:{self.bootstrap_port}"

    def _wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def init(self) -> ControllerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [_bin("veilnet-controller"), "init", "--data-dir", str(self.data), "--trust-domain", self.trust_domain]
        for name in self.server_names:
            argv += ["--server-name", name]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        self.ca_hash = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("ca hash:"))
        return self

    def start(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("controller already running")
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(
                self._wrap([_bin("veilnet-controller"), "serve", "--data-dir", str(self.data),
                            "--listen", self.control_endpoint, "--bootstrap-listen", self.bootstrap_endpoint,
                            "--certificate-lifetime", self.certificate_lifetime, *self.serve_args]),
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == "serving" for e in self.events(self.log_offset)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"controller not serving after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        stop_process_group(proc, sig, timeout)
        return proc.returncode

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def __enter__(self) -> ControllerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ logs

    def log_text(self, since: int = 0) -> str:
        return read_log(self.log_path, since)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        return json_lines(self.log_text(since))

    # ------------------------------------------------------------------ credentials and veilctl

    def operator(self, name: str, role: str, *, lifetime: str = "1d") -> Path:
        """Credentials directory for an operator with ``role`` (admin's comes from init)."""
        out = self.workdir / "operators" / name
        if name == "admin" and role == "admin":
            return self.data / "operators" / "admin"
        subprocess.run([_bin("veilnet-controller"), "operator-cert", "--data-dir", str(self.data), "--name", name,
                        "--role", role, "--out", str(out), "--lifetime", lifetime],
                       capture_output=True, text=True, check=True)
        return out

    def veilctl(self, *args: str, credentials: Path | None = None, check: bool = False,
                input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [_bin("veilctl"), "--controller", self.control_endpoint,
                "--credentials", str(credentials or self.operator("admin", "admin")), *args]
        res = subprocess.run(self._wrap(argv), capture_output=True, text=True, input=input,
                             timeout=timeout * TIME_SCALE)
        if check and res.returncode != 0:
            raise RuntimeError(f"veilctl {' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def token(self, node: str, ttl: int = 600) -> str:
        out = self.veilctl("-o", "json", "token", "create", node, "--ttl", str(ttl), check=True).stdout
        return str(json.loads(out)["token"])

    def apply(self, spec_path: Path | str, *, message: str = "test", wait: float = 60) -> int:
        res = self.veilctl("-o", "json", "apply", "-f", str(spec_path), "-m", message, "--wait", str(wait))
        if res.returncode != 0:
            raise RuntimeError(f"veilctl apply failed ({res.returncode}): {res.stderr}{res.stdout}")
        return int(json.loads(res.stdout)["revision"])

    def nodes(self) -> dict[str, dict[str, Any]]:
        out = self.veilctl("-o", "json", "nodes", check=True).stdout
        return {n["name"]: n for n in json.loads(out)["nodes"]}
