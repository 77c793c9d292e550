"""The agent's local API on a unix socket: status, and attaching container endpoints.

Who may call: root, and members of ``controller.socket_group`` (the container
runtime's plugin). The kernel checks first: the socket is created 0660, owned
root and that group, in a directory only root can write to (the agent refuses
to start with a socket directory that others can write to, where anyone could
replace the socket). The agent then checks every connection again with the
credentials the kernel recorded when the caller connected (``SO_PEERCRED``:
pid, uid, gid; ``SO_PEERGROUPS``: supplementary groups), so a socket whose mode
was loosened still serves no one else, and it logs who attached or detached
what (uid, gid, pid, process name).

gRPC's Python server cannot do that check: a unix-socket peer is reported as
just ``unix:``, its auth context is empty for unix sockets, and there is no API
to hand it a connection accepted elsewhere. So the agent accepts connections
on the public socket itself (the front door): it reads the credentials, closes
the connection at once if they are not allowed, and otherwise relays its bytes
to gRPC's own socket, in a 0700 directory next to it, from a client socket
bound to a random abstract name that identifies the connection. gRPC reports
that name as the call's peer (``unix-abstract:...``), and the servicer maps it
back to the caller's credentials; a call whose peer the front door did not
register is refused.

Requests are handed to the daemon thread, which owns all state; the handlers
only wait for its answer.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from veilnet.v1 import agent_pb2 as apb
from veilnet.v1 import agent_pb2_grpc

from ..core.errors import VeilnetError
from ..logs import get_logger

REQUEST_TIMEOUT = 30.0
MAX_MESSAGE = 1024 * 1024
MAX_DETAILS = 2000  # characters of a status message
MAX_CONNECTIONS = 64  # relayed at once; more are refused (each holds two threads)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; not named by Python 3.11
PEERGROUPS_BUFFER = 1024  # bytes: 256 groups (Python's getsockopt limit); a caller with more is judged on its gid
RELAY_CHUNK = 64 * 1024
ABSTRACT_PREFIX = "veilnet-local-api/"
ROOT_UID = 0


class LocalApiError(VeilnetError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LocalRequest:
    """A request for the daemon thread; it sets ``reply`` to a response message or a LocalApiError."""

    kind: str  # "status" | "attach" | "detach"
    payload: Any
    reply: Future[Any]


# ---------------------------------------------------------------------- who is calling


@dataclass(frozen=True)
class Caller:
    """A connected process as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None  # supplementary groups; None if there were too many to read
    process: str  # /proc/<pid>/comm at connect time

    def log_fields(self) -> dict[str, object]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "process": self.process}


def peer_caller(conn: socket.socket) -> Caller:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: tuple[int, ...] | None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BUFFER)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:  # ERANGE: more groups than the buffer holds
        groups = None
    try:
        process = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        process = "?"
    return Caller(pid=pid, uid=uid, gid=gid, groups=groups, process=process)


def refusal(caller: Caller, group: str | None, group_gid: int | None) -> str | None:
    """Why ``caller`` may not use the API (None: it may): only root and members of the socket group."""
    if caller.uid == ROOT_UID:
        return None
    if group_gid is not None and (caller.gid == group_gid or group_gid in (caller.groups or ())):
        return None
    allowed = f"root or a member of group {group} (controller.socket_group)" if group else (
        "root (no controller.socket_group is configured)")
    return f"uid {caller.uid} gid {caller.gid} is not {allowed}"


# ---------------------------------------------------------------------- where the socket lives


def directory_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a directory on the socket's path is unsafe (None: it is safe).

    Safe: owned by root and writable by no one else, or (like /tmp) owned by root with the sticky
    bit, where no one else can remove or rename root's entries.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != ROOT_UID:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        return f"{path} is writable by others (mode {mode:04o}) without the sticky bit"
    return None


def check_socket_directory(socket_path: Path) -> None:
    """Raise VeilnetError if anyone but root could replace the socket: every existing directory up to / is checked."""
    directory = socket_path.parent
    for candidate in (directory, *directory.parents):
        try:
            st = candidate.stat()
        except FileNotFoundError:
            continue  # created by the agent (0755, root)
        problem = directory_problem(candidate, st)
        if problem is not None:
            raise VeilnetError(
                f"refusing to create the local API socket {socket_path}: {problem}, so others could replace "
                "the socket; use a directory only root can write to, such as /run/veilnet (controller.local_socket)")


# ---------------------------------------------------------------------- the front door


class _Relay:
    """One accepted connection relayed to gRPC's socket, in both directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket, name: str, done: Callable[[str], None]) -> None:
        self.client, self.upstream, self.name = client, upstream, name
        self._done = done
        self._open = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        for src, dst, label in ((self.client, self.upstream, "in"), (self.upstream, self.client, "out")):
            threading.Thread(target=self._pump, args=(src, dst), name=f"local-api-{label}", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(RELAY_CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
        finally:
            with self._lock:
                self._open -= 1
                last = self._open == 0
            if last:
                self.close()
                self._done(self.name)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._open == 0:
            for sock in (self.client, self.upstream):
                sock.close()


class _FrontDoor:
    """Accepts on the public socket, admits only allowed callers, relays them to gRPC."""

    def __init__(self, listener: socket.socket, upstream_path: Path, group: str | None, group_gid: int | None,
                 log: Any) -> None:
        self.listener = listener
        self.upstream_path = upstream_path
        self.group, self.group_gid = group, group_gid
        self.log = log
        self.run_token = secrets.token_hex(8)
        self.callers: dict[str, Caller] = {}  # abstract name of the relay's upstream socket -> the caller
        self.relays: dict[str, _Relay] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="local-api-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            relays = list(self.relays.values())
        for relay in relays:
            relay.close()

    def caller(self, peer: str) -> Caller | None:
        name = peer.removeprefix("unix-abstract:")
        if name == peer:
            return None
        with self._lock:
            return self.callers.get(name)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            try:
                self._admit(conn)
            except Exception:  # one bad connection must not stop the door
                self.log.exception("local_api_accept_failed")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        caller = peer_caller(conn)
        why = refusal(caller, self.group, self.group_gid)
        with self._lock:
            if why is None and len(self.relays) >= MAX_CONNECTIONS:
                why = f"too many connections ({MAX_CONNECTIONS})"
        if why is not None:
            self.log.warning("local_api_refused", **caller.log_fields(), reason=why)
            conn.close()
            return
        name = f"{ABSTRACT_PREFIX}{self.run_token}/{secrets.token_hex(8)}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            upstream.bind(f"\0{name}")
            upstream.connect(str(self.upstream_path))
        except OSError as exc:
            upstream.close()
            conn.close()
            self.log.error("local_api_relay_failed", **caller.log_fields(), reason=str(exc))
            return
        relay = _Relay(conn, upstream, name, self._forget)
        with self._lock:
            self.callers[name] = caller
            self.relays[name] = relay
        self.log.debug("local_api_connected", **caller.log_fields())
        relay.start()

    def _forget(self, name: str) -> None:
        with self._lock:
            self.callers.pop(name, None)
            self.relays.pop(name, None)


# ---------------------------------------------------------------------- gRPC


def _guarded(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one place a local API call ends: a LocalApiError becomes its status; anything else unexpected is
    logged with a correlation id and answered INTERNAL with that id (never the exception); the server goes on.
    (Handlers never call ``context.abort``, which grpc implements by raising a bare Exception.)"""

    def wrap(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def guarded(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return handler(self, request, context)
            except LocalApiError as exc:
                failure: tuple[grpc.StatusCode, str] = (exc.code, str(exc))
            except Exception as exc:
                error_id = secrets.token_hex(8)
                self.log.error("local_api_failed", method=method, error_id=error_id, exc_info=exc)
                failure = (grpc.StatusCode.INTERNAL,
                           f"internal error {error_id}: the agent logged the details under this id")
            context.abort(failure[0], status_details(failure[1]))
            raise AssertionError("unreachable: abort raises")

        guarded.__veilnet_guarded__ = True  # type: ignore[attr-defined]
        return guarded

    return wrap


def status_details(message: str) -> str:
    """Bounded (MAX_DETAILS characters) and encodable as UTF-8, as a gRPC status needs."""
    if len(message) > MAX_DETAILS:
        message = message[: MAX_DETAILS - 3] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class _Servicer(agent_pb2_grpc.AgentLocalServicer):  # type: ignore[misc]
    def __init__(self, submit: Callable[[LocalRequest], None], door: Callable[[], _FrontDoor | None],
                 log: Any) -> None:
        self.submit = submit
        self.door = door
        self.log = log

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        door = self.door()
        caller = door.caller(context.peer()) if door is not None else None
        if caller is None:
            self.log.warning("local_api_refused", peer=context.peer(), reason="did not come through the local socket")
            raise LocalApiError(grpc.StatusCode.PERMISSION_DENIED, "connect through the agent's local socket")
        return caller

    def _ask(self, kind: str, payload: Any, context: grpc.ServicerContext, method: str,
             **what: object) -> Any:
        caller = self._caller(context)
        request = LocalRequest(kind, payload, Future())
        emit = self.log.debug if kind == "status" else self.log.info
        self.submit(request)
        try:
            try:
                answer = request.reply.result(timeout=REQUEST_TIMEOUT)
            except TimeoutError:
                if request.reply.cancel():  # still queued: it will not run later behind the caller's back
                    emit("local_api_call", method=method, **what, result="timeout", **caller.log_fields())
                    raise LocalApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "the agent did not answer in time; nothing changed") from None
                answer = request.reply.result()  # it started meanwhile: wait for its real outcome
        except LocalApiError as exc:
            emit("local_api_call", method=method, **what, result=exc.code.name.lower(), reason=str(exc),
                 **caller.log_fields())
            raise
        emit("local_api_call", method=method, **what, result="ok", **caller.log_fields())
        return answer

    @_guarded("Status")
    def Status(self, request: apb.StatusRequest, context: grpc.ServicerContext) -> apb.StatusResponse:
        return self._ask("status", None, context, "Status")  # type: ignore[no-any-return]

    @_guarded("AttachEndpoint")
    def AttachEndpoint(self, request: apb.AttachEndpointRequest,
                       context: grpc.ServicerContext) -> apb.AttachEndpointResponse:
        e = request.endpoint
        self._ask("attach", e, context, "AttachEndpoint", endpoint=_cut(e.name), segment=_cut(e.segment),
                  netns=_cut(e.netns), mac=_cut(e.mac), ipv4=_cut(e.ipv4), ipv6=_cut(e.ipv6))
        return apb.AttachEndpointResponse()

    @_guarded("DetachEndpoint")
    def DetachEndpoint(self, request: apb.DetachEndpointRequest,
                       context: grpc.ServicerContext) -> apb.DetachEndpointResponse:
        self._ask("detach", request.name, context, "DetachEndpoint", endpoint=_cut(request.name))
        return apb.DetachEndpointResponse()


def _cut(text: str, limit: int = 200) -> str:
    """A caller's text as logged: at most ``limit`` characters (a request may carry a megabyte name)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class LocalApiServer:
    def __init__(self, path: Path, group: str | None, submit: Callable[[LocalRequest], None],
                 node: str = "") -> None:
        self.path = path
        self.group = group
        self.log = get_logger(node=node, component="local_api")
        # gRPC listens in a directory of its own that only root can enter; callers reach it through the door.
        self.grpc_dir = path.parent / f".{path.name}.grpc"
        self.grpc_path = self.grpc_dir / "grpc.sock"
        self._door: _FrontDoor | None = None
        self._bound = False  # the public socket file is ours to remove
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="local-api"),
                                   options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        agent_pb2_grpc.add_AgentLocalServicer_to_server(_Servicer(submit, lambda: self._door, self.log), self._server)

    def check_directory(self) -> None:
        check_socket_directory(self.path)

    def start(self) -> None:
        self.check_directory()
        group_gid = None
        if self.group:
            try:
                group_gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise VeilnetError(f"controller.socket_group: no group {self.group!r} on this host") from None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._prepare_grpc_dir()
        if not self._server.add_insecure_port(f"unix://{self.grpc_path}"):
            raise VeilnetError(f"cannot listen on {self.grpc_path}")
        self._server.start()
        try:
            listener = self._listen(group_gid)
        except BaseException:
            self.stop()
            raise
        self._door = _FrontDoor(listener, self.grpc_path, self.group, group_gid, self.log)
        self._door.start()
        self.log.info("local_api_listening", socket=str(self.path), group=self.group or "root")

    def _prepare_grpc_dir(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.grpc_dir, 0o700)
        st = os.lstat(self.grpc_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != ROOT_UID:
            raise VeilnetError(f"{self.grpc_dir} exists and is not a directory owned by root; not using it")
        os.chmod(self.grpc_dir, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.grpc_path.unlink()  # a stale socket of a previous run

    def _listen(self, group_gid: int | None) -> socket.socket:
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o117)  # the socket is born 0660: no window where others could connect
        try:
            listener.bind(str(self.path))
        except OSError as exc:
            listener.close()
            raise VeilnetError(f"cannot listen on {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        self._bound = True
        try:
            os.chmod(self.path, 0o660)
            if group_gid is not None:
                os.chown(self.path, ROOT_UID, group_gid)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        return listener

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise VeilnetError(f"{self.path} exists and is not a socket; not replacing it")
        self.path.unlink()  # a stale socket of a previous run

    def stop(self) -> None:
        if self._door is not None:
            self._door.stop()
            self._door = None
        self._server.stop(grace=1).wait()
        for path in (self.path, self.grpc_path) if self._bound else (self.grpc_path,):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._bound = False
        with contextlib.suppress(OSError):
            self.grpc_dir.rmdir()


def client(path: Path) -> agent_pb2_grpc.AgentLocalStub:
    return agent_pb2_grpc.AgentLocalStub(grpc.insecure_channel(f"unix://{path}"))
