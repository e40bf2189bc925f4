"""The loops of every rank but the driver: a stage's leader receives a step, runs the stage, passes the result on;
its other tensor ranks run what the leader shares with them."""

from __future__ import annotations

from .payload import StepPayload, TokenPayload, from_wire
from .stage import StageRuntime
from .transport import PeerInfo, StageFailure, Transport


def serve_stage(runtime: StageRuntime, transport: Transport, is_last: bool) -> None:
    """Runs until a 'stop' payload has gone round (stage 0 sends it at shutdown)."""
    while True:
        p = transport.recv_step()
        if p.kind in ("heartbeat", "stop"):
            runtime.signal(p.kind)
            if is_last:
                transport.send_tokens(TokenPayload(p.kind))
            else:
                transport.send_step(StepPayload(kind=p.kind))
            if p.kind == "stop":
                transport.flush()
                return
            continue
        out = runtime.run(p)
        out.stats = p.stats + [runtime.stats()]  # busy time of every stage so far travels with the step
        if is_last:
            transport.send_tokens(out)
        else:
            transport.send_step(out)


def follow_stage(runtime: StageRuntime, peers: list[PeerInfo], rank: int) -> None:
    """A tensor rank that does not lead its stage: run every step the leader shares, until it shares 'stop'."""
    group = runtime.group
    while True:
        try:
            header, tensors = group.receive()
        except RuntimeError as e:  # the leader went silent for the group's timeout, or its connection closed
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StageFailure(f"{peers[group.leader].describe()} shared nothing (hung or dead); seen by "
                               f"{peers[rank].describe()} ({msg[:160]})") from None
        it = iter(tensors)
        p = from_wire(header, lambda shape, dtype: next(it))
        if p.kind == "stop":
            return
        if p.kind == "step":
            runtime.run(p)
