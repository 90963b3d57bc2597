"""A request with many sequences cannot slow another request's tokens (issue 25, load-test goal): while
another request has work it puts at most ``max_step_tokens_per_request`` tokens in a step, its sequences
taking turns; the prompts of one client request share its limits (``Sequence.client``)."""

from __future__ import annotations

import httpx

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import SHARE_GRACE_STEPS, Scheduler, SchedulerConfig
from jaxinfer.sequence import Sequence
from tests.serve.fake_engine import FakeEngine


def _sched(step: int | None = 2, **kw) -> Scheduler:
    kw = {"max_num_batched_tokens": 256, "max_model_len": 1024, **kw}
    return Scheduler(SchedulerConfig(max_num_seqs=32, num_pages=2048, page_size=16, max_step_tokens_per_request=step,
                                     **kw))


def _add(sched: Scheduler, group: str, n: int, prompt: list[int], max_tokens: int = 1000, client=None) -> None:
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        sched.add(Sequence(f"{i}:{group}", prompt, params, group=group, client=client))


def _step(sched: Scheduler):
    out = sched.schedule()
    sched.update(out, [5] * len(out.scheduled))
    return out


def _tokens(out, client: str) -> int:
    return sum(r.num_new_tokens + r.num_lookahead for r in out.scheduled if r.seq.client == client)


def test_big_request_takes_turns_while_another_request_has_work():
    sched = _sched()
    _add(sched, "big", 64, [1, 2, 3, 4])
    first = _step(sched)
    assert _tokens(first, "big") == 16 * 4  # alone: every slot its cap allows (half of 32), whole prompts
    assert len(_step(sched).scheduled) == 16  # alone: 16 decode rows per step
    _add(sched, "small", 1, [7, 8, 9], max_tokens=20)
    before = {s.request_id: s.num_output_tokens for s in sched.running if s.client == "big"}
    for k in range(20):
        out = _step(sched)
        assert any(r.seq.client == "small" for r in out.scheduled), f"step {k}: the small request waited"
        assert _tokens(out, "big") <= 2, f"step {k}: the big request had {_tokens(out, 'big')} tokens"
    assert sched.get("0:small") is None  # finished: 20 tokens in 20 steps, one per step
    progress = sorted(s.num_output_tokens - before[s.request_id] for s in sched.running if s.client == "big")
    assert progress == [2] * 8 + [3] * 8, progress  # 40 rows shared evenly (round robin) by its 16 sequences
    for _ in range(SHARE_GRACE_STEPS):  # still shared for a grace period (a next request of the same client)
        assert _tokens(_step(sched), "big") == 2
    assert len(_step(sched).scheduled) == 16  # alone again: full steps


def test_prefill_tokens_of_a_big_request_are_limited_too():
    sched = _sched(step=4)
    _add(sched, "small", 1, [7, 8, 9], max_tokens=50)
    _step(sched)
    _add(sched, "big", 8, list(range(10, 210)))  # 8 samples of a 200-token prompt
    for _ in range(10):
        out = _step(sched)
        assert _tokens(out, "big") <= 4 and any(r.seq.client == "small" for r in out.scheduled)


def test_single_sequence_requests_are_not_limited():
    sched = _sched(step=2)
    _add(sched, "a", 1, list(range(10, 110)))
    _add(sched, "b", 1, list(range(200, 300)))
    out = _step(sched)
    assert _tokens(out, "a") == 100 and _tokens(out, "b") == 100  # both prompts whole in one step


def test_no_limit_when_off():
    sched = _sched(step=None)
    _add(sched, "big", 32, [1, 2, 3, 4])
    _step(sched)
    _add(sched, "small", 1, [7, 8, 9])
    out = _step(sched)
    assert _tokens(out, "big") == 16  # every running sample decodes (the engine's default)


def test_prompts_of_one_client_request_share_its_slots_and_share():
    sched = _sched(step=2)
    for p in range(2):  # one client request: 2 prompts x n=16, two engine requests
        _add(sched, f"atk-{p}", 16, [1, 2, 3, p + 4], client="atk")
    _step(sched)
    assert sum(s.client == "atk" for s in sched.running) == 16  # the per-request cap counts both prompts
    _add(sched, "small", 1, [7, 8, 9])
    out = _step(sched)
    assert _tokens(out, "atk") <= 2 and any(r.seq.client == "small" for r in out.scheduled)
    # without the client key the two prompts are two requests, each with its own cap: every slot taken
    plain = _sched(step=None)
    for p in range(2):
        _add(plain, f"atk-{p}", 16, [1, 2, 3, p + 4])
    _step(plain)
    assert len(plain.running) == 32


class _RecordsClient(FakeEngine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.clients: dict[str, str | None] = {}

    def add_request(self, request_id, prompt, sampling_params, *, arrival_time=None, client=None):
        self.clients[request_id] = client
        super().add_request(request_id, prompt, sampling_params, arrival_time=arrival_time)


def test_server_passes_one_client_key_per_api_request(make_server):
    srv = make_server(engine=_RecordsClient(step_delay=0.001))
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    r = httpx.post(srv.http_url + "/v1/completions", json={"prompt": "single", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    clients = srv.fake.clients
    batch = [rid for rid in clients if rid.endswith(("-0", "-1", "-2"))]
    assert len(batch) == 3 and len({clients[rid] for rid in batch}) == 1 and clients[batch[0]] is not None
    assert batch[0].startswith(clients[batch[0]])  # the client key is the API request's id
    single = [rid for rid in clients if rid not in batch]
    assert len(single) == 1 and clients[single[0]] is None  # a single prompt is its own engine request


def test_without_chunked_prefill_a_big_request_over_its_share_does_not_block_others():
    sched = _sched(step=2, enable_chunked_prefill=False, max_model_len=256)
    _add(sched, "small", 1, [7, 8, 9], max_tokens=5)
    _step(sched)
    _add(sched, "big", 4, list(range(10, 30)))  # 20-token prompts: more than the share, and not chunkable
    _add(sched, "late", 1, [5, 6])
    out = _step(sched)
    assert _tokens(out, "big") == 0 and _tokens(out, "late") == 2  # the big one waits, the late one overtakes
