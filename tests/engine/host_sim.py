"""Test helpers: a fake model that runs packed steps against a simulated paged KV memory, a sequential
reference generator, and an engine loop that checks scheduler invariants after every step."""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass

import numpy as np

from jaxinfer.block_manager import BlockManager, cdiv
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxinfer.sequence import Sequence, SequenceStatus
from jaxinfer.step_inputs import StepBuckets, pack_step_inputs

VOCAB = 48
EOS = 0


def fake_next_token(tokens) -> int:
    """Deterministic 'model': the next token is a hash of the whole context."""
    digest = hashlib.blake2b(array("q", tokens).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB


def reference_generate(prompt, params: SamplingParams, max_model_len: int, eos=(EOS,)):
    """Plain sequential generation with the stop rules written out independently."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        t = fake_next_token(tokens)
        tokens.append(t)
        out.append(t)
        if len(out) > params.min_tokens:
            if t in eos and not params.ignore_eos:
                return out, "stop"
            if t in params.stop_token_ids:
                return out, "stop"
        if len(out) >= params.max_tokens or len(tokens) >= max_model_len:
            return out, "length"


class FakeDevice:
    """Writes each step's tokens into a flat KV memory at ``slot_mapping``, then, for every sequence row,
    reads its context back through ``page_indices`` (as paged attention would) and 'samples' from it."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.kv = np.full(num_pages * page_size, -1, np.int64)

    def step(self, inputs, bm: BlockManager) -> list[int]:
        ps = self.page_size
        n = inputs.num_tokens
        slots = inputs.slot_mapping[:n]
        assert (slots >= 0).all() and (inputs.slot_mapping[n:] == -1).all()
        assert len(set(slots.tolist())) == n, "two tokens written to one slot"
        for slot in slots.tolist():
            pid = slot // ps
            assert bm.ref_count(pid) == 1, "step writes into a shared page"
            assert not bm.is_cached(pid), "step writes into a cached page"
        self.kv[slots] = inputs.tokens[:n]
        sampled = []
        for s, row in enumerate(inputs.rows):
            kv_len = int(inputs.kv_lens[s])
            pos = np.arange(kv_len)
            ctx = self.kv[inputs.page_indices[s][pos // ps] * ps + pos % ps].tolist()
            assert ctx == row.seq.all_token_ids[:kv_len], f"KV of {row.seq.request_id} is wrong"
            sampled.append(fake_next_token(ctx) if inputs.sample_mask[s] else -1)
        return sampled


@dataclass
class Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int = 0  # step at which the request is added
    abort_at: int | None = None  # step at which the request is aborted (if still unfinished)


def check_accounting(sched: Scheduler) -> None:
    bm = sched.block_manager
    live = list(sched.running) + list(sched.waiting)
    expected = [0] * bm.num_pages
    for seq in live:
        for pid in seq.block_table:
            expected[pid] += 1
    for pid in range(bm.num_pages):
        assert bm.ref_count(pid) == expected[pid]
    used = sum(1 for e in expected if e)
    assert used + len(bm._free) + len(bm._evictable) == bm.num_pages
    assert not set(bm._free) & set(bm._evictable)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) * bm.page_size >= seq.num_computed_tokens
        assert 1 <= seq.num_uncomputed_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    orders = [s.order for s in sched.running] + [s.order for s in sched.waiting]
    assert orders == sorted(orders), "running must be older than waiting, each in FCFS order"


def check_schedule(sched: Scheduler, out: SchedulerOutput, before: dict) -> None:
    """Budgets, decode-first order, FCFS admission, newest-first preemption."""
    cfg = sched.config
    rows = out.scheduled
    assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(rows) <= cfg.max_num_seqs
    assert len({r.seq.request_id for r in rows}) == len(rows)
    decode_ids = before["decode_ids"]
    for i, r in enumerate(rows):
        assert r.seq.status is SequenceStatus.RUNNING
        assert r.start == r.seq.num_computed_tokens and r.start + r.num_new_tokens <= r.seq.num_tokens
        assert r.samples == (r.start + r.num_new_tokens == r.seq.num_tokens)
        if i < out.num_decode_seqs:
            assert r.seq.request_id in decode_ids and r.num_new_tokens == 1
        else:
            assert r.seq.request_id not in decode_ids, "a decode scheduled after a prefill"
    preempted = {s.request_id for s in out.preempted}
    scheduled = {r.seq.request_id for r in rows}
    # Decodes are never starved: each one is scheduled unless it was preempted.
    assert decode_ids <= scheduled | preempted
    admitted = [r.seq.request_id for r in rows if r.seq.request_id in before["waiting_ids"]]
    assert admitted == before["waiting_ids"][: len(admitted)], "admission is not FCFS"
    if preempted:
        assert not admitted, "admitted a waiting request in a step that preempted"
        assert min(s.order for s in out.preempted) > max((s.order for s in sched.running), default=-1)
    for s in out.preempted:
        assert s.status is SequenceStatus.WAITING and s.request_id not in scheduled
    # Work-conserving: a chunk cut short, or a running sequence left out, only when the budget is spent.
    if any(not r.samples for r in rows) or any(s.request_id not in scheduled for s in sched.running):
        assert out.num_scheduled_tokens == cfg.max_num_batched_tokens


def run_engine(reqs: list[Req], config: SchedulerConfig, eos=(EOS,), max_steps: int = 5000) -> dict:
    """Drive scheduler + step packing + fake device; returns {rid: (outputs, finish_reason)} and stats."""
    sched = Scheduler(config, eos)
    buckets = StepBuckets.from_scheduler_config(config)
    shapes = set(buckets.shapes())
    dev = FakeDevice(config.num_pages, config.page_size)
    seqs = {r.rid: Sequence(r.rid, r.prompt, r.params) for r in reqs}
    streamed: dict[str, list[int]] = {r.rid: [] for r in reqs}
    result: dict[str, tuple[list[int], str]] = {}
    by_arrival = sorted(reqs, key=lambda r: r.arrive)
    step = 0
    while step < max_steps:
        while by_arrival and by_arrival[0].arrive <= step:
            sched.add(seqs[by_arrival.pop(0).rid])
        for r in reqs:
            if r.abort_at == step and r.rid not in result and seqs[r.rid].order >= 0:
                seq = sched.abort(r.rid)
                assert seq is not None and seq.finish_reason == "abort" and not seq.block_table
                result[r.rid] = (list(seq.output_token_ids), "abort")
        check_accounting(sched)
        if not sched.has_unfinished():
            if not by_arrival:
                break
            step += 1
            continue
        before = {
            "decode_ids": {s.request_id for s in sched.running if s.num_uncomputed_tokens == 1},
            "waiting_ids": [s.request_id for s in sched.waiting],
        }
        out = sched.schedule()
        check_schedule(sched, out, before)
        assert not out.is_empty, "unfinished requests but nothing scheduled"
        inputs = pack_step_inputs(out, buckets)
        assert inputs.bucket in shapes
        sampled = dev.step(inputs, sched.block_manager)
        for upd in sched.update(out, sampled):
            streamed[upd.seq.request_id].extend(upd.new_token_ids)
            assert upd.new_token_ids == upd.seq.output_token_ids[-len(upd.new_token_ids) :] or not (
                upd.new_token_ids
            )
            if upd.finished:
                assert not upd.seq.block_table and sched.get(upd.seq.request_id) is None
                result[upd.seq.request_id] = (list(upd.seq.output_token_ids), upd.seq.finish_reason)
        check_accounting(sched)
        step += 1
    assert not sched.has_unfinished(), "did not finish"
    bm = sched.block_manager
    assert bm.num_used_pages == 0 and bm.num_free_pages == bm.num_pages, "pages leaked"
    for rid, (out_ids, _) in result.items():
        assert streamed[rid] == out_ids, "streamed tokens differ from the sequence's outputs"
    return {"outputs": result, "stats": sched.stats(), "steps": step}


def random_requests(rng: random.Random, n: int, max_prompt: int, shared: list[list[int]], **kw) -> list[Req]:
    reqs = []
    for i in range(n):
        prefix = rng.choice(shared) if shared and rng.random() < 0.7 else []
        tail = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))]
        prompt = (prefix + tail)[: max_prompt + len(prefix)]
        params = SamplingParams(
            max_tokens=rng.randint(1, kw.get("max_tokens", 24)),
            ignore_eos=rng.random() < 0.3,
            min_tokens=rng.choice([0, 0, 2]),
            stop_token_ids=tuple(rng.sample(range(1, VOCAB), 1)) if rng.random() < 0.2 else (),
        )
        reqs.append(Req(f"r{i}", prompt, params, arrive=rng.randint(0, kw.get("spread", 10))))
    return reqs


def pages_needed(req: Req, config: SchedulerConfig) -> int:
    kv = min(len(req.prompt) + req.params.max_tokens - 1, config.max_model_len)
    return cdiv(kv, config.page_size)
