"""The agent's side of the control channel: one outbound mutual-TLS ``Sync`` stream, kept alive.

The host needs no listening port: the agent dials the controller. Messages
from the controller are handed to the daemon's inbox; the daemon alone
touches the kernel. When the stream breaks the agent keeps enforcing its last
applied state and reconnects with jittered exponential backoff; each new
stream starts with a hello and the controller answers with a full snapshot,
which the daemon diffs against what it holds (nothing changed: nothing applied).
"""

from __future__ import annotations

import queue
import random
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import controller_pb2_grpc

from ..logs import get_logger
from .enrollment import IdentityFiles, renew

INITIAL_BACKOFF = 0.5
MAX_RECEIVE = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE),
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class _NotAccepted(Exception):
    pass


@dataclass(frozen=True)
class StreamEvent:
    """What the client thread tells the daemon: a message, or that the stream went up or down."""

    kind: str  # "message" | "connected" | "disconnected"; the daemon also posts "wake", "renewed", "renew_failed"
    message: cpb.ControllerMessage | None = None
    reason: str = ""


def backoff_delays(initial: float, maximum: float, rng: random.Random) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform in [d/2, d], d doubling up to ``maximum``."""
    delay = initial
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(maximum, delay * 2)


class ControlClient:
    def __init__(self, files: IdentityFiles, hello: Callable[[], cpb.Hello], deliver: Callable[[StreamEvent], None],
                 node: str, max_backoff: float) -> None:
        self.files = files
        self.hello = hello
        self.deliver = deliver
        self.max_backoff = max_backoff
        self.log = get_logger(node=node, component="control")
        self._stop = threading.Event()
        self._outgoing: queue.Queue[cpb.AgentMessage | None] | None = None
        self._call: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self.connected = False
        self.endpoint = ""
        self._misbehaved = False  # the daemon ended the stream over a bad message: back off before dialling

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cancel()
        self._thread.join(timeout=5)

    def send(self, message: cpb.AgentMessage) -> bool:
        """Queue a message on the current stream; False if there is none (the next hello carries the state)."""
        with self._lock:
            if self._outgoing is None:
                return False
            self._outgoing.put(message)
            return True

    def reconnect(self, reason: str, *, misbehaved: bool = False) -> None:
        """End the current stream (e.g. after a certificate renewal); the loop dials again at once,
        or after the backoff delay if the controller ``misbehaved`` (a bad message must not cause a dial loop)."""
        self.log.info("control_reconnect", reason=reason)
        self._misbehaved = misbehaved
        self._cancel()

    def _cancel(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def renew_certificate(self) -> str:
        """Renew over a fresh channel with the current identity; returns the new serial."""
        channel = grpc.secure_channel(self.files.control_endpoint(), self.files.channel_credentials(),
                                      options=CHANNEL_OPTIONS)
        try:
            identity = renew(self.files, channel)
        finally:
            channel.close()
        self.reconnect("certificate renewed")
        return identity.serial

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        delays = backoff_delays(INITIAL_BACKOFF, self.max_backoff, random.Random())
        while not self._stop.is_set():
            try:
                got_message = self._one_stream()
            except Exception as exc:  # this thread is the only one that dials: it must not end
                self.log.error("control_stream_failed", error_id=secrets.token_hex(8), exc_info=exc,
                               note="still enforcing the last applied state; dialling again after the backoff")
                got_message, self._misbehaved = False, True
                self.connected = False
            misbehaved, self._misbehaved = self._misbehaved, False
            if self._stop.is_set():
                break
            if got_message and not misbehaved:
                delays = backoff_delays(INITIAL_BACKOFF, self.max_backoff, random.Random())
                delay = 0.05  # a stream that worked and ended (renewal, controller restart): dial again soon
            else:
                delay = next(delays)
            self._stop.wait(delay)

    def _one_stream(self) -> bool:
        """Run one Sync stream to its end. True if the controller accepted it and sent a decodable message."""
        outgoing: queue.Queue[cpb.AgentMessage | None] = queue.Queue()
        got_message = False
        reason = "stream ended"
        try:
            self.endpoint = self.files.control_endpoint()
            channel = grpc.secure_channel(self.endpoint, self.files.channel_credentials(), options=CHANNEL_OPTIONS)
        except Exception as exc:  # unreadable identity files: report, keep enforcing, retry later
            self.log.error("control_identity_unusable", error=str(exc))
            return False
        # The hello is built and the queue opened in one step: a report the daemon sends before this finds
        # no queue but is in the hello; one sent after it is queued behind the hello. None is lost.
        try:
            with self._lock:
                outgoing.put(cpb.AgentMessage(hello=self.hello()))
                self._outgoing = outgoing
        except BaseException:
            channel.close()
            raise

        def requests() -> Iterator[cpb.AgentMessage]:
            while True:
                item = outgoing.get()
                if item is None:
                    return
                yield item

        try:
            call = controller_pb2_grpc.ControllerStub(channel).Sync(requests())
            with self._lock:
                self._call = call
            if self._stop.is_set():
                call.cancel()
            # The controller sends its initial metadata once it accepted our hello; a call that failed
            # (controller down, refused) returns none of it.
            if not any(key == "veilnet-node" for key, _ in call.initial_metadata() or ()):
                call.cancel()
                for _ in call:  # raises the call's real status
                    pass
                raise _NotAccepted("the controller closed the stream without accepting it")
            self.connected = True
            self.log.info("control_connected", controller=self.endpoint)
            self.deliver(StreamEvent("connected"))
            for message in call:  # an undecodable message ends the stream (INTERNAL) before got_message
                got_message = True
                self.deliver(StreamEvent("message", message))
        except _NotAccepted as exc:
            reason = str(exc)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            reason = f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}"
            if code == grpc.StatusCode.ABORTED:  # another host holds this identity's stream: do not fight it
                self._misbehaved = True
        finally:
            with self._lock:
                self._call = None
                self._outgoing = None
            outgoing.put(None)
            channel.close()
        was_connected = self.connected
        self.connected = False
        if not self._stop.is_set():
            emit = self.log.warning if was_connected or "UNAUTHENTICATED" in reason else self.log.info
            emit("control_disconnected", controller=self.endpoint, reason=reason,
                 note="still enforcing the last applied state")
            self.deliver(StreamEvent("disconnected", reason=reason))
        return got_message
