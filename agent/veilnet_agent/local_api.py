"""The agent's local API on a unix socket: status, and attaching container endpoints.

The socket is created mode 0660 (owner root, group ``controller.socket_group``
when configured), inside a 0755 directory, so only root and that group (the
container runtime's plugin) can attach endpoints. Requests are handed to the
daemon thread, which owns all state; the handlers only wait for its answer.
"""

from __future__ import annotations

import contextlib
import grp
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from veilnet.v1 import agent_pb2 as apb
from veilnet.v1 import agent_pb2_grpc

from .errors import VeilnetError

REQUEST_TIMEOUT = 30.0
MAX_MESSAGE = 1024 * 1024


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


class _Servicer(agent_pb2_grpc.AgentLocalServicer):  # type: ignore[misc]
    def __init__(self, submit: Callable[[LocalRequest], None]) -> None:
        self.submit = submit

    def _ask(self, kind: str, payload: Any, context: grpc.ServicerContext) -> Any:
        request = LocalRequest(kind, payload, Future())
        self.submit(request)
        try:
            try:
                return request.reply.result(timeout=REQUEST_TIMEOUT)
            except TimeoutError:
                if request.reply.cancel():  # still queued: it will not run later behind the caller's back
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "the agent did not answer in time; nothing changed")
                return request.reply.result()  # it started meanwhile: wait for its real outcome
        except LocalApiError as exc:
            context.abort(exc.code, str(exc))

    def Status(self, request: apb.StatusRequest, context: grpc.ServicerContext) -> apb.StatusResponse:
        return self._ask("status", None, context)  # type: ignore[no-any-return]

    def AttachEndpoint(self, request: apb.AttachEndpointRequest,
                       context: grpc.ServicerContext) -> apb.AttachEndpointResponse:
        self._ask("attach", request.endpoint, context)
        return apb.AttachEndpointResponse()

    def DetachEndpoint(self, request: apb.DetachEndpointRequest,
                       context: grpc.ServicerContext) -> apb.DetachEndpointResponse:
        self._ask("detach", request.name, context)
        return apb.DetachEndpointResponse()


class LocalApiServer:
    def __init__(self, path: Path, group: str | None, submit: Callable[[LocalRequest], None]) -> None:
        self.path = path
        self.group = group
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="local-api"),
                                   options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        agent_pb2_grpc.add_AgentLocalServicer_to_server(_Servicer(submit), self._server)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a previous run
        old_umask = os.umask(0o117)  # the socket is born 0660: no window where others could connect
        try:
            if not self._server.add_insecure_port(f"unix://{self.path}"):
                raise VeilnetError(f"cannot listen on {self.path}")
            self._server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        if self.group:
            os.chown(self.path, 0, grp.getgrnam(self.group).gr_gid)

    def stop(self) -> None:
        self._server.stop(grace=1).wait()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def client(path: Path) -> agent_pb2_grpc.AgentLocalStub:
    return agent_pb2_grpc.AgentLocalStub(grpc.insecure_channel(f"unix://{path}"))
