"""Block sizes for the ragged paged attention implementations.

Every choice here is a static function of array shapes (never of traced lengths), so one compiled
step shape always uses the same blocks. The numbers are starting points from first principles, not
measurements on a TPU or GPU; ``bench/attention.py`` is where they get tuned.

Terms: ``block_q`` is query tokens per work item (or per grid block); a KV block is
``kv_pages_per_block`` pages, i.e. ``kv_pages_per_block * page_size`` key positions; ``G`` is the number
of query heads sharing one KV head (GQA ratio).
"""

from __future__ import annotations

import dataclasses


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def prev_power_of_2(x: int) -> int:
    """Largest power of two <= ``x`` (1 for ``x <= 1``)."""
    return 1 if x <= 1 else 1 << (int(x).bit_length() - 1)


def round_up(x: int, multiple: int) -> int:
    """``x`` rounded up to a multiple of ``multiple``."""
    return -(-x // multiple) * multiple


def _pages_for(tokens: int, page_size: int, pages_per_seq: int) -> int:
    return max(1, min(pages_per_seq, tokens // page_size))


@dataclasses.dataclass(frozen=True)
class XlaBlockSizes:
    """Blocks of the pure-jnp path (CPU production path and oracle).

    Attributes:
      block_q: query tokens per work item of a long multi-token sequence (a prefill chunk of more than
        ``short_q`` tokens). Single-token (decode) sequences always use one-token items, so decode does
        no padded query work.
      short_q: multi-token sequences of at most this many tokens (speculative verify rows, short prefill
        tails) form one ``short_q``-row item each, so a batch of verify rows does not pad every
        sequence to ``block_q`` query rows.
      decode_group: decode items processed together per step of the outer loop.
      short_group: short items processed together per step of the outer loop.
      prefill_group: long multi-token items processed together per step of the outer loop.
      kv_pages_per_block: pages gathered per step of the inner (online-softmax) loop.
      shared_prefix_min_pages: decode sequences sharing at least this many leading pages with another
        are attended to those pages as a group (:mod:`.shared_prefix`); 0 turns grouping off.
      shared_prefix_rows: query rows per work item of the shared-prefix pass.
      shared_prefix_group: shared-prefix items processed together per step of the outer loop.
    """

    block_q: int
    decode_group: int
    prefill_group: int
    kv_pages_per_block: int
    short_q: int = 8
    short_group: int = 1
    shared_prefix_min_pages: int = 0
    shared_prefix_rows: int = 8
    shared_prefix_group: int = 1


def xla_block_sizes(num_tokens: int, max_num_seqs: int, page_size: int, pages_per_seq: int) -> XlaBlockSizes:
    """Blocks for the XLA path: ~128 keys per inner step, ~64 query rows per long prefill item, 8 rows
    per short (verify) item.

    Groups were picked by timing the CPU path (2-core Xeon): 16 decode items at a time (items are
    sorted by key range, so a group of 16 similar lengths wastes little; 64 ragged sequences at 65-640
    keys took ~13 ms per layer against ~22 ms as one unsorted group of 64), one item at a time for a few
    verify rows, two at a time from about 16 of them; four long items at a time for prefill. 128-key
    blocks beat 256 for decode (32 rows at 530-600 keys: ~9.6 vs ~12.4 ms per layer; less padding past
    each group's longest sequence) and were even for prefill.

    Decode rows sharing at least 64 prefix tokens (whole pages) are grouped for a shared-prefix pass,
    8 rows per item, two items at a time: 32 rows in 4 groups of 8 sharing 512 of ~570 keys took
    ~4.7 ms per layer against ~8.0 ms without grouping (1 item at a time or 16-row items were
    slower); on unshared batches finding no groups costs ~0.1-0.3 ms per layer (32 rows at 25-90
    keys, 64 rows at 65-640 keys), the shared-prefix pass being skipped.
    """
    short_q = min(8, next_power_of_2(num_tokens))
    return XlaBlockSizes(
        block_q=min(64, next_power_of_2(num_tokens)),
        decode_group=max(1, min(16, max_num_seqs, num_tokens)),
        prefill_group=4,
        kv_pages_per_block=_pages_for(128, page_size, pages_per_seq),
        short_q=short_q,
        short_group=2 if min(max_num_seqs, num_tokens // 2) >= 16 else 1,
        shared_prefix_min_pages=max(1, 64 // page_size),
        shared_prefix_rows=8,
        shared_prefix_group=2,
    )


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Blocks of the Pallas TPU kernel.

    Attributes:
      block_q: query tokens per grid step (one grid step = one block of the flattened token axis).
        ``block_q * G`` is the row count of every matmul; it is kept a multiple of 16 so the q / out
        blocks tile for f32 (8 sublanes) and bf16 (16).
      kv_pages_per_block: pages per DMA'd KV block (double-buffered in VMEM).
    """

    block_q: int
    kv_pages_per_block: int


def tpu_block_sizes(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, page_size: int, pages_per_seq: int
) -> TpuBlockSizes:
    """About 128 matmul rows (``block_q * G``) and 256 keys per KV block.

    128 rows keep decode (one real row per sequence and KV head group) near the memory roofline on
    the MXU while giving prefill full-height tiles.
    """
    group = num_q_heads // num_kv_heads
    block_q = max(16, prev_power_of_2(128 // group))
    block_q = min(block_q, max(16, next_power_of_2(num_tokens)))
    return TpuBlockSizes(block_q=block_q, kv_pages_per_block=_pages_for(256, page_size, pages_per_seq))


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Blocks of the Pallas GPU (Triton) kernel.

    Attributes:
      block_q: query tokens per work item; ``block_q * next_power_of_2(G)`` rows per ``tl.dot``
        (>= 16, a power of two).
      block_kv: keys per inner-loop step (a power of two).
      num_splits: KV splits per work item (flash-decoding); partial results are merged afterwards.
      num_warps, num_stages: Triton launch parameters.
    """

    block_q: int
    block_kv: int
    num_splits: int
    num_warps: int
    num_stages: int


def gpu_block_sizes(
    num_tokens: int,
    max_num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    *,
    target_programs: int = 264,
) -> GpuBlockSizes:
    """Decode-shaped buckets (``num_tokens <= max_num_seqs``) get 16-row items and KV splits so that
    about ``target_programs`` programs run (2 per SM on an H100); other buckets get 64-row items.
    """
    group_p2 = next_power_of_2(num_q_heads // num_kv_heads)
    decode_like = num_tokens <= max_num_seqs
    rows = 16 if decode_like else 64
    block_q = max(1, rows // group_p2)
    block_kv = 64 if head_dim >= 128 else 128
    max_keys = pages_per_seq * page_size
    num_splits = 1
    if decode_like:
        items = min(max_num_seqs, num_tokens)
        programs = max(1, items * num_kv_heads)
        want = max(1, target_programs // programs)
        num_splits = int(max(1, min(want, max_keys // 512, 16)))
    return GpuBlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        num_splits=num_splits,
        num_warps=4 if block_q * group_p2 <= 32 else 8,
        num_stages=2,
    )
