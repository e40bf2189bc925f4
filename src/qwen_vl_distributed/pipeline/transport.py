"""Payloads over torch.distributed point-to-point, around the ring stage 0 -> 1 -> ... -> S-1 -> 0.

With tensor ranks (parallel/), the ring joins the stages' leaders (``ring``: their global ranks in stage order);
a leader shares what it receives with its stage's other ranks (pipeline.stage).

Two planes. The control plane always runs on a gloo group (host memory, TCP): a length (int64 [1]) and a JSON
header holding everything small -- kind, micro-batch, layout, new sequences' sampling parameters, per-stage stats,
and the step's token ids and M-RoPE positions (or, on the way back to stage 0, the sampled tokens) -- then the
step's block tables as one int32 message (a 32k-token sequence lists thousands of blocks: binary, not JSON). The
data plane
carries the one large tensor, hidden [T, H], on the main backend: NCCL GPU to GPU, or gloo. So a hop costs one small
TCP exchange and one device-to-device transfer, and reading the header never forces a GPU sync. Tags keep the two
directions apart (0: steps, 1: tokens).

Every wait is bounded by ``timeout_s``: a peer that sends nothing for that long is declared hung, and a closed
connection (a peer died) is reported at once -- both as a StageFailure naming the stage, rank and host.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError
from .payload import StepPayload, TokenPayload, from_wire, on_host_plane, to_wire

STEP_TAG, TOKEN_TAG = 0, 1
HEADER_BYTES = 4096  # the first control message of every payload: 8-byte length, then JSON (rest follows if longer)
SPIN_S = 0.002  # NCCL waits spin this long before they start sleeping between polls


class StageFailure(UserError, RuntimeError):
    """Another stage died, hung or refused to start; the message names it. Printed as one line, exit code 3."""

    exit_code = 3


@dataclass(frozen=True)
class PeerInfo:
    rank: int
    host: str
    pid: int
    stage: int
    tp_rank: int | None = None  # the tensor rank within the stage, with more than one per stage

    def describe(self) -> str:
        tensor = "" if self.tp_rank is None else f" tensor rank {self.tp_rank}"
        return f"stage {self.stage}{tensor} (rank {self.rank}, pid {self.pid} on {self.host})"


class Transport:
    def __init__(self, rank: int, ring: list[int], backend: str, device: torch.device, timeout_s: float,
                 peers: list[PeerInfo], hidden_dtype: torch.dtype, control=None):
        """``ring``: the global ranks of the stages (their leaders), in stage order; ``rank`` is one of them."""
        self.rank, self.ring, self.backend = rank, ring, backend
        self.world = len(ring)  # stages
        self._at = ring.index(rank)
        self.control = control  # gloo group for headers; None: the default group (already gloo)
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.timeout_s = timeout_s
        self.peers = peers
        self.hidden_dtype = hidden_dtype
        self._pending: list[tuple[int, list, list[torch.Tensor]]] = []  # sends in flight (keep tensors alive)

    @property
    def next_rank(self) -> int:
        return self.ring[(self._at + 1) % self.world]

    @property
    def prev_rank(self) -> int:
        return self.ring[(self._at - 1) % self.world]

    # -- steps ------------------------------------------------------------------------------------------------------
    def send_step(self, p: StepPayload) -> None:
        header, tensors = to_wire(p)  # visual inputs never cross a stage boundary
        tables = [t for t in tensors if on_host_plane(t.dtype)]  # the block tables, on the control plane
        data = [t for t in tensors if not on_host_plane(t.dtype)]
        if data:  # the hidden states, as this run's activations travel
            data = [data[0].to(self.device, self.hidden_dtype)]
            header["dtype"] = str(self.hidden_dtype).removeprefix("torch.")  # what is actually sent
        self._send(header, data, self.next_rank, STEP_TAG, tables)

    def recv_step(self) -> StepPayload:
        h = self._recv_header(self.prev_rank, STEP_TAG)

        def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if on_host_plane(dtype):  # the block tables, on the control plane
                flat = torch.empty(shape, dtype=dtype)
                self._wait(self._irecv(flat, self.prev_rank, STEP_TAG, self.control), self.prev_rank, control=True)
                return flat
            return self._recv_tensor(shape, dtype, self.prev_rank, STEP_TAG)

        return from_wire(h, take)

    # -- tokens back to stage 0 ---------------------------------------------------------------------------------
    def send_tokens(self, p: TokenPayload) -> None:
        p.settle()  # a step's tokens and log-probabilities as host values (a no-op unless the stage ran ahead)
        header = {"kind": p.kind, "mb": p.mb, "stats": p.stats,
                  "tokens": None if p.tokens is None else p.tokens.tolist(), "logprobs": p.logprobs}
        self._send(header, [], self.ring[0], TOKEN_TAG)

    def recv_tokens(self) -> TokenPayload:
        h = self._recv_header(self.ring[-1], TOKEN_TAG)
        tokens = None if h["tokens"] is None else torch.tensor(h["tokens"], dtype=torch.long)
        return TokenPayload(h["kind"], h["mb"], tokens, h["logprobs"], h["stats"])

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _send(self, header: dict, data: list[torch.Tensor], dst: int, tag: int,
              more_control: list[torch.Tensor] = ()) -> None:
        """The header (and ``more_control``, host tensors) on the control plane, then ``data`` on the main one."""
        body = json.dumps(header).encode()
        first = bytearray(HEADER_BYTES)
        first[:8] = len(body).to_bytes(8, "little")
        head = body[:HEADER_BYTES - 8]
        first[8:8 + len(head)] = head
        control = [torch.frombuffer(first, dtype=torch.uint8)]
        if len(body) > len(head):  # long prompts: ids and positions of thousands of tokens
            control.append(torch.frombuffer(bytearray(body[len(head):]), dtype=torch.uint8))
        control += list(more_control)
        self._reap()
        try:
            works = [(dist.isend(m, dst=dst, tag=tag, group=self.control), True) for m in control]
            works += [(dist.isend(m, dst=dst, tag=tag), False) for m in data]
        except RuntimeError as e:
            raise self._failure(dst, e) from None
        self._pending.append((dst, works, control + data))

    def _reap(self, keep: int | None = None) -> None:
        """Finish old sends so their buffers can go; keep at most ``keep`` (default: the world size) in flight."""
        keep = self.world if keep is None else keep
        while len(self._pending) > keep:
            dst, works, _ = self._pending.pop(0)
            for w, control in works:
                self._wait(w, dst, control=control)

    def flush(self) -> None:
        self._reap(keep=0)

    def _recv_header(self, src: int, tag: int) -> dict:
        first = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        self._wait(self._irecv(first, src, tag, self.control), src, control=True)
        raw = first.numpy().tobytes()
        n = int.from_bytes(raw[:8], "little")
        body = raw[8:8 + min(n, HEADER_BYTES - 8)]
        if n > len(body):
            rest = torch.empty(n - len(body), dtype=torch.uint8)
            self._wait(self._irecv(rest, src, tag, self.control), src, control=True)
            body += rest.numpy().tobytes()
        return json.loads(body.decode())

    def _recv_tensor(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(self._irecv(t, src, tag, None), src)
        return t

    def _irecv(self, t: torch.Tensor, src: int, tag: int, group):
        try:
            return dist.irecv(t, src=src, tag=tag, group=group)
        except RuntimeError as e:
            raise self._failure(src, e) from None

    def _wait(self, work, peer: int, control: bool = False) -> None:
        try:
            if self.backend == "gloo" or control:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
                return
            start = time.monotonic()
            while not work.is_completed():  # NCCL: poll, so a hung peer cannot block us forever
                waited = time.monotonic() - start
                if waited > self.timeout_s:
                    raise TimeoutError(f"timed out after {self.timeout_s:.0f} s")
                if waited > SPIN_S:  # a hop normally lands within microseconds of its header: spin first
                    time.sleep(0.0002)
            work.wait()
        except (RuntimeError, TimeoutError) as e:
            raise self._failure(peer, e) from None

    def _failure(self, peer: int, e: Exception) -> StageFailure:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        who = self.peers[peer].describe()
        me = self.peers[self.rank].describe()
        if "timed out" in msg.lower() or "timeout" in msg.lower():
            why = f"sent nothing for {self.timeout_s:.0f} s (hung or dead)"
        elif "closed" in msg.lower() or "reset" in msg.lower():
            why = "closed its connection (it died, or stopped on an error of its own)"
        else:
            return StageFailure(f"{who} failed: {msg[:200]}; seen by {me}")
        return StageFailure(f"{who} {why}; seen by {me} ({msg[:160]})")  # (the transport's own words)
