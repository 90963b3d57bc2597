"""One client request's engine requests (one per prompt), merged into a single event stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from serve.errors import APIError


class Generation:
    """Submits one engine request per prompt and yields ``(prompt_index, RequestOutput)`` deltas.

    Admission is all-or-nothing: ``check_admission(len(prompts) * n)`` (sequences) runs before the first
    submit, and
    nothing awaits in between, so a batch is never half admitted. ``abort()`` (idempotent) must run
    on every exit path; it aborts whatever has not finished.
    """

    def __init__(self, engine, prompts: list[list[int]], params: list[SamplingParams], *, prefix: str,
                 arrival_time: float):
        engine.check_admission(len(prompts) * params[0].n)
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.prompts = prompts
        self.n = params[0].n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.streams = []
        for i, (ids, sp) in enumerate(zip(prompts, params)):
            rid = self.id if len(prompts) == 1 else f"{self.id}-{i}"
            self.streams.append(engine.submit(ids, sp, request_id=rid, arrival_time=arrival_time,
                                              client=None if len(prompts) == 1 else self.id))

    async def wait_accepted(self) -> None:
        """Return once the engine took every prompt; on a rejection abort the rest and raise."""
        try:
            for s in self.streams:
                await s.wait_accepted()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def usage(self) -> dict:
        """OpenAI ``usage`` for the tokens seen so far."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of every prompt as they arrive; raises the first ``APIError`` of any prompt."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                self._count(out)
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out, None))
            except APIError as e:
                queue.put_nowait((i, None, e))
                return
            queue.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                    continue
                self._count(out)
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    def _count(self, out: RequestOutput) -> None:
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
