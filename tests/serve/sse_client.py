"""A small async SSE client for the OpenAI streaming endpoints (raw httpx, to see the wire format)."""

from __future__ import annotations

import json

import httpx


async def stream_request(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """POST ``body`` with ``stream: true``; returns ``{"status", "text", "finish_reason", "chunks", "error",
    "usage", "done"}`` (text of choice 0; ``error`` is the JSON body of a non-200 answer or an error event)."""
    out = {"status": None, "text": "", "finish_reason": None, "chunks": 0, "error": None, "usage": None,
           "done": False}
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread())["error"]
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            obj = json.loads(data)
            if "error" in obj:
                out["error"] = obj["error"]
                continue
            out["chunks"] += 1
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            for c in obj["choices"]:
                out["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
                out["finish_reason"] = c["finish_reason"] or out["finish_reason"]
    return out
