"""Request-plane frames: the typed messages on a Tandem TCP connection (worker or registry).

Wire format: each frame is a 4-byte big-endian length, then one msgpack-encoded `Frame` (a msgspec
tagged union). Many streams share one connection; every stream frame carries the stream id `sid`
that the client chose when it sent `Open` (sid 0 is the connection itself).

    client                         server
    Open(sid, call)        ->
                           <-      Tokens(sid, output)*   (streamed engine outputs; a generate
                                                           stream's first has no tokens and no
                                                           finish: the engine took the request in)
                           <-      Reply(sid, body)*      (unary / watch answers)
                           <-      End(sid) | Fail(sid, code, message)
    Cancel(sid)            ->      (client gave up: the server aborts the call, sends nothing more)
    Open(0, call)          ->      (a notice: the server acts on the call and answers nothing;
                                    e.g. ExpectCall, a request the router has sent this way)
    Ping(n)                ->
                           <-      Pong(n)
"""

from __future__ import annotations

import msgspec

from tandem.protocol.kv_events import KvCacheDump, KvEvent
from tandem.protocol.messages import EngineOutput, GenerateRequest
from tandem.protocol.registry import WorkerInfo, WorkerStats


class GenerateCall(msgspec.Struct, tag="generate", array_like=True):
    request: GenerateRequest


class ExpectCall(msgspec.Struct, tag="expect", array_like=True):
    """A notice (sid 0): a GenerateCall for `request_id` will follow on this connection soon. The
    router picked this worker as the request reached the frontend, before tokenizing it; the
    engine's regroup hold waits for it (`tandem.engine.regroup`)."""

    request_id: str


class StatsCall(msgspec.Struct, tag="stats", array_like=True):
    pass


class RegisterCall(msgspec.Struct, tag="register", array_like=True):
    """Grant a lease of `ttl` seconds and store `info` under it."""

    info: WorkerInfo
    ttl: float


class KeepAliveCall(msgspec.Struct, tag="keepalive", array_like=True):
    """Refresh a lease; replace its info when `info` is set. Answered Ack(ok=False) if it expired."""

    lease_id: int
    info: WorkerInfo | None = None


class RevokeCall(msgspec.Struct, tag="revoke", array_like=True):
    lease_id: int


class ListCall(msgspec.Struct, tag="list", array_like=True):
    pass


class WatchCall(msgspec.Struct, tag="watch", array_like=True):
    """Stream a WorkerList now and after every change, until cancelled."""


class KvEventsCall(msgspec.Struct, tag="kv_events", array_like=True):
    """Stream the worker's KV events (`KvEventBatch` replies) until cancelled. Events a slow
    subscriber cannot take are dropped: the subscriber sees the gap in ids and asks for a dump."""


class KvDumpCall(msgspec.Struct, tag="kv_dump", array_like=True):
    """Every block the worker's prefix cache holds now (one `KvDumpReply`)."""


Call = (
    GenerateCall
    | ExpectCall
    | StatsCall
    | RegisterCall
    | KeepAliveCall
    | RevokeCall
    | ListCall
    | WatchCall
    | KvEventsCall
    | KvDumpCall
)


class LeaseGrant(msgspec.Struct, tag="lease", array_like=True):
    lease_id: int
    ttl: float


class Ack(msgspec.Struct, tag="ack", array_like=True):
    ok: bool = True


class WorkerList(msgspec.Struct, tag="workers", array_like=True):
    workers: list[WorkerInfo]


class KvEventBatch(msgspec.Struct, tag="kv_batch", array_like=True):
    """One engine step's KV events, in event-id order."""

    events: list[KvEvent]


class KvDumpReply(msgspec.Struct, tag="kv_dump_reply", array_like=True):
    dump: KvCacheDump


ReplyBody = WorkerStats | LeaseGrant | Ack | WorkerList | KvEventBatch | KvDumpReply


class Open(msgspec.Struct, tag="open", array_like=True):
    sid: int
    call: Call


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    sid: int


class Tokens(msgspec.Struct, tag="tok", array_like=True):
    sid: int
    output: EngineOutput


class Reply(msgspec.Struct, tag="reply", array_like=True):
    sid: int
    body: ReplyBody


class End(msgspec.Struct, tag="end", array_like=True):
    sid: int


class Fail(msgspec.Struct, tag="fail", array_like=True):
    """The stream failed. `code` is a `TandemError.code`; sid 0 fails the whole connection."""

    sid: int
    code: str
    message: str


class Ping(msgspec.Struct, tag="ping", array_like=True):
    nonce: int


class Pong(msgspec.Struct, tag="pong", array_like=True):
    nonce: int


Frame = Open | Cancel | Tokens | Reply | End | Fail | Ping | Pong
StreamFrame = Open | Cancel | Tokens | Reply | End | Fail


def merge_outputs(first: EngineOutput, second: EngineOutput) -> EngineOutput:
    """One output equivalent to `first` followed by `second` (same request): tokens and logprobs
    concatenated, the later finish and counters kept. Used to coalesce a lagging stream."""
    assert first.request_id == second.request_id, "merging outputs of different requests"
    logprobs = None
    if first.new_logprobs is not None or second.new_logprobs is not None:
        logprobs = (first.new_logprobs or []) + (second.new_logprobs or [])
    return EngineOutput(
        request_id=first.request_id,
        new_token_ids=first.new_token_ids + second.new_token_ids,
        finish_reason=second.finish_reason,
        new_logprobs=logprobs,
        num_prompt_tokens=second.num_prompt_tokens or first.num_prompt_tokens,
        num_cached_tokens=second.num_cached_tokens or first.num_cached_tokens,
        stop_reason=second.stop_reason if second.stop_reason is not None else first.stop_reason,
        kv_transfer_params=second.kv_transfer_params or first.kv_transfer_params,
        engine_ttft_s=first.engine_ttft_s or second.engine_ttft_s,
    )
