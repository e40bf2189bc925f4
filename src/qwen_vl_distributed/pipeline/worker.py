"""The loop of every stage but the driver: receive a step, run the stage, pass the result on."""

from __future__ import annotations

from .payload import StepPayload, TokenPayload
from .stage import StageRuntime
from .transport import Transport


def serve_stage(runtime: StageRuntime, transport: Transport, is_last: bool) -> None:
    """Runs until a 'stop' payload has gone round (stage 0 sends it at shutdown)."""
    while True:
        p = transport.recv_step()
        if p.kind in ("heartbeat", "stop"):
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
