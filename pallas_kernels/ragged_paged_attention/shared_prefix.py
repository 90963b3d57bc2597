"""Shared-prefix ("cascade") grouping of decode sequences, found on device from the page tables.

With prefix caching, sequences whose prompts share a prefix point at the same physical pages for it.
Attending each decode row to those pages separately reads the same keys once per row. Grouping the
rows by shared prefix lets the XLA path attend each group's rows to the prefix pages together (one key
gather, a real matmul over all the group's rows) and each row to its own remaining keys alone, then
merge the two partial softmaxes by their log-sum-exps. The result is the same attention.

Everything here is pure jnp on traced metadata, so one compiled shape serves every mix.

Grouping rule. For a decode sequence ``s`` (one query row) let ``full[s] = (kv_len[s] - 1) // page_size``
be its pages wholly before the page holding its query's key, and ``m = min_pages``. Sequences with
``full >= m`` that hold the same page in slot ``m - 1`` are candidates for one group, led by the first
of them ``l``. Each candidate's shared prefix is the number of leading slots where its page table and
``l``'s agree (within both ``full``); it joins the group if that is at least ``m``, and the group's
prefix is the minimum over its members, read through ``l``'s page table. Groups with a single member
are dropped. Equal page ids mean equal keys (the pages are the same memory), so the grouping never
changes the result, only how it is computed. (With prefix caching a page in slot ``m - 1`` identifies
the whole prefix before it, so candidates always share all ``m`` pages; the check keeps arbitrary
page tables correct.) The cost is ``O(S^2 + S * P)`` per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.metadata import SeqTable


class PrefixGroups(NamedTuple):
    """Decode rows grouped by shared prefix (``S`` = sequence slots, all arrays ``i32`` unless noted).

    Attributes:
      key_start: ``[S]`` first key each sequence attends to in the per-sequence pass (the group's
        prefix length in tokens for grouped sequences, else 0).
      table: ``SeqTable`` of the prefix pass, one virtual sequence per leader slot ``l``: ``q_len`` =
        its members, ``kv_len`` = prefix tokens, ``q_start`` = first member's row in ``rows``; its keys
        are read through ``page_indices[l]``.
      rows: ``[S]`` token row (into ``q``) of each prefix-pass row; entries ``>= num_rows`` are ``T``
        (out of range, dropped on scatter).
      num_rows: ``i32[]`` grouped rows.
    """

    key_start: jax.Array
    table: SeqTable
    rows: jax.Array
    num_rows: jax.Array


def find_groups(table: SeqTable, page_indices: jax.Array, page_size: int, min_pages: int,
                num_tokens: int) -> PrefixGroups:
    """Group the decode sequences of ``table`` by shared leading pages (see the module docstring).

    Args:
      table: per-sequence metadata (``metadata.seq_table``).
      page_indices: ``i32[S, P]``.
      page_size: tokens per page.
      min_pages: a sequence joins a group only if it shares at least this many pages with another.
      num_tokens: ``T``, the step's query rows (used as the "no row" marker).
    """
    s, p = page_indices.shape
    m = max(1, min(min_pages, p))
    idx = jnp.arange(s, dtype=jnp.int32)
    decode = table.q_len == 1
    full = jnp.where(decode, jnp.maximum(table.kv_len - 1, 0) // page_size, 0)
    # Candidate leader: the first sequence with the same page in slot m - 1 (both owning m pages).
    deep = jnp.where(full >= m, page_indices[:, m - 1], -1 - idx)  # unique negative ids when too short
    same = deep[:, None] == deep[None, :]  # [S, S]
    leader = jnp.argmax(same, axis=1).astype(jnp.int32)  # first match (s itself at the latest)
    # Shared pages with the leader: leading slots where both tables agree, within both sequences' pages.
    slot = jnp.arange(p, dtype=jnp.int32)
    agree = (page_indices == page_indices[leader]) & (slot[None, :] < jnp.minimum(full, full[leader])[:, None])
    shared = jnp.where(jnp.all(agree, axis=1), p, jnp.argmin(agree, axis=1)).astype(jnp.int32)
    eligible = (jnp.sum(same, axis=1) >= 2) & (shared >= m)
    leader = jnp.where(eligible, leader, s)
    count = jax.ops.segment_sum(jnp.ones_like(leader), leader, num_segments=s + 1)[:s]
    count = jnp.where(count >= 2, count, 0)  # single-member groups are dropped
    lead = jnp.minimum(leader, s - 1)
    grouped = eligible & (count[lead] > 0)
    leader = jnp.where(grouped, leader, s)
    big = jnp.iinfo(jnp.int32).max
    prefix_pages = jax.ops.segment_min(jnp.where(grouped, shared, big), leader, num_segments=s + 1)[:s]
    prefix_tokens = jnp.where(count > 0, prefix_pages, 0) * page_size
    key_start = jnp.where(grouped, prefix_tokens[lead], 0)
    # Prefix-pass rows: grouped sequences sorted by leader (ungrouped last).
    order = jnp.argsort(leader, stable=True)
    num_rows = grouped.sum().astype(jnp.int32)
    rows = jnp.where(idx < num_rows, table.q_start[order], num_tokens)
    q_start = (jnp.cumsum(count) - count).astype(jnp.int32)
    vtable = SeqTable(q_start=q_start, q_len=count.astype(jnp.int32), kv_len=prefix_tokens.astype(jnp.int32))
    return PrefixGroups(key_start.astype(jnp.int32), vtable, rows.astype(jnp.int32), num_rows)


def merge(out: jax.Array, lse: jax.Array, rows: jax.Array, prefix_out: jax.Array,
          prefix_lse: jax.Array) -> jax.Array:
    """Combine two partial attentions over disjoint key sets by their log-sum-exps.

    Args:
      out, lse: ``f32[T, Hq, D]`` / ``f32[T, Hq]`` of the per-sequence pass (normalised output and
        log-sum-exp of its scores; ``-inf`` where a row saw no key).
      rows: ``i32[R]`` token rows the prefix pass computed (``>= T`` = none).
      prefix_out, prefix_lse: ``f32[R, Hq, D]`` / ``f32[R, Hq]`` of the prefix pass, row ``i`` for
        token row ``rows[i]``.

    Returns:
      ``out`` with the rows in ``rows`` replaced by the attention over both key sets.
    """
    t = out.shape[0]
    safe = jnp.minimum(rows, t - 1)
    o1, l1 = out[safe], lse[safe]
    m = jnp.maximum(l1, prefix_lse)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    w1, w2 = jnp.exp(l1 - m), jnp.exp(prefix_lse - m)
    denom = w1 + w2
    merged = (o1 * w1[..., None] + prefix_out * w2[..., None]) / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.at[rows].set(merged, mode="drop")
