"""What an attacker with root on one host can send the controller: its own stream, its own messages.

Opens a Sync stream with the host's identity (its key and certificate, as the agent would) and publishes
an IPsec epoch key for the node that is signed with a key which is NOT the certificate's (``--mode
forged``). The controller relays it to the node's peers (it does not hold, and does not need, a trust
anchor for epoch keys: the peers check them against the certificate it attaches); each peer must refuse
it. Then the stream ends; the real agent reconnects on its own.

    python integration/ipsec_inject.py --identity STATE_DIR/identity --node host-c --epoch N --mode forged
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import controller_pb2_grpc
from veilnet_agent.control.client import CHANNEL_OPTIONS
from veilnet_agent.control.enrollment import IdentityFiles
from veilnet_agent.core.encryption import ipsec_keys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--epoch", type=int, required=True, help="the epoch to claim (above the node's current)")
    parser.add_argument("--mode", choices=("forged",), default="forged")
    args = parser.parse_args()
    files = IdentityFiles(args.identity)
    not_the_certificates_key = ec.generate_private_key(ec.SECP256R1())
    key = ipsec_keys.EpochKey.generate(args.node, args.epoch, int(time.time()), 3600)
    published = key.publish(not_the_certificates_key)
    outgoing: queue.Queue[cpb.AgentMessage | None] = queue.Queue()
    outgoing.put(cpb.AgentMessage(hello=cpb.Hello(agent_version="attacker")))
    outgoing.put(cpb.AgentMessage(epoch_key=cpb.EpochKey(
        node=published.node, epoch=published.epoch, created=published.created, expires=published.expires,
        public_key=published.public, signature=published.signature)))

    def requests():  # type: ignore[no-untyped-def]
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    channel = grpc.secure_channel(files.control_endpoint(), files.channel_credentials(), options=CHANNEL_OPTIONS)
    call = controller_pb2_grpc.ControllerStub(channel).Sync(requests())
    received = 0
    try:
        for _message in call:  # the snapshot (and perhaps relayed keys) come back: the stream is accepted
            received += 1
            if received == 1:
                time.sleep(2)  # long enough for the relay to go out
                outgoing.put(None)
                break
    except grpc.RpcError as exc:
        print(f"stream ended: {exc.code()} {exc.details()}", file=sys.stderr)
    finally:
        call.cancel()
        channel.close()
    print(f"sent a forged epoch key {args.epoch} for {args.node}; {received} messages received")
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
