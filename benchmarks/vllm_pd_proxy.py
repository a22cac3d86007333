"""A minimal P/D proxy for two `vllm serve` processes with NixlConnector (what vLLM's toy proxy does).

    python benchmarks/vllm_pd_proxy.py --port 8100 --prefill 127.0.0.1:8101 --decode 127.0.0.1:8102

POST /v1/completions: the request goes to the prefill server with max_tokens=1, stream off and
kv_transfer_params {"do_remote_decode": true}; the kv_transfer_params it returns go with the
original request to the decode server, whose SSE stream is passed through. The prefill's token is
not sent to the client: vLLM's decode server pulls the prompt's KV, recomputes the last prompt
token and samples the first token itself, so the client's first token comes from the decode side.

GET /timings: per-request phases, newest last, for benchmarks/disagg_ttft.py:
    {"prefill_s": prefill request sent -> its reply, "handoff_s": decode request sent -> first chunk}
Benchmark tooling, not part of Tandem.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import aiohttp
from aiohttp import web


def make_app(prefill: str, decode: str) -> web.Application:
    timings: list[dict[str, float]] = []

    async def session(app: web.Application) -> Any:
        # One pooled session for both upstreams, as a real proxy keeps connections warm.
        app["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        yield
        await app["http"].close()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        http: aiohttp.ClientSession = request.app["http"]
        pre = {
            **body,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": {"do_remote_decode": True},
        }
        pre.pop("stream_options", None)
        t0 = time.perf_counter()
        async with http.post(f"http://{prefill}/v1/completions", json=pre) as r:
            if r.status != 200:
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            reply = await r.json()
        t1 = time.perf_counter()
        dec = {**body, "kv_transfer_params": reply.get("kv_transfer_params")}
        out = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await out.prepare(request)
        first: float | None = None
        async with http.post(f"http://{decode}/v1/completions", json=dec) as r:
            async for chunk in r.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                await out.write(chunk)
        timings.append({"prefill_s": t1 - t0, "handoff_s": (first or time.perf_counter()) - t1})
        del timings[:-1000]
        await out.write_eof()
        return out

    async def get_timings(_: web.Request) -> web.Response:
        return web.json_response(timings)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/timings", get_timings)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--prefill", required=True, help="host:port of the prefill vllm serve")
    ap.add_argument("--decode", required=True, help="host:port of the decode vllm serve")
    args = ap.parse_args()
    web.run_app(make_app(args.prefill, args.decode), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
