"""Per-op HBM bytes read from compiled HLO (jaxinfer.hlo_traffic), checked on CPU-compiled programs whose
traffic is known by arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.hlo_traffic import op_traffic, parse_hlo, traffic_by_source

V, E = 4096, 256


def _ops(fn, *args, **jit_kw):
    return op_traffic(jax.jit(fn, **jit_kw).lower(*args).compile().as_text())


def test_gather_charges_rows_not_table():
    table = jax.ShapeDtypeStruct((V, E), jnp.float32)
    ids = jax.ShapeDtypeStruct((4,), jnp.int32)
    total = sum(o.bytes for o in _ops(lambda t, i: jnp.take(t, i, axis=0) * 2.0, table, ids))
    assert total < 16 * 4 * E * 4  # a few rows read and written, never the 4 MiB table
    assert total >= 4 * E * 4


def test_matmul_charges_operands_and_result():
    x = jax.ShapeDtypeStruct((8, E), jnp.float32)
    w = jax.ShapeDtypeStruct((E, V), jnp.float32)
    total = sum(o.bytes for o in _ops(lambda a, b: a @ b, x, w))
    expected = (8 * E + E * V + 8 * V) * 4
    assert total == pytest.approx(expected, rel=0.05)


def test_in_place_update_charges_the_update():
    buf = jax.ShapeDtypeStruct((V, E), jnp.float32)
    row = jax.ShapeDtypeStruct((1, E), jnp.float32)
    ops = _ops(lambda b, r, i: jax.lax.dynamic_update_slice(b, r, (i, 0)), buf, row,
               jax.ShapeDtypeStruct((), jnp.int32), donate_argnums=0)
    assert sum(o.bytes for o in ops) < 8 * E * 4  # not 2 x the 4 MiB buffer


def test_kernels_marked_and_grouped_by_source():
    x = jax.ShapeDtypeStruct((8, E), jnp.float32)
    w = jax.ShapeDtypeStruct((E, V), jnp.float32)

    def f(a, b):
        with jax.named_scope("paged_attention"):
            return a @ b

    ops = _ops(f, x, w)
    assert any(o.kernel for o in ops)
    by_source = traffic_by_source(ops)
    assert sum(by_source.values()) == sum(o.bytes for o in ops)


def test_parse_hlo_refuses_text_without_entry():
    with pytest.raises(ValueError, match="no ENTRY"):
        parse_hlo("HloModule m\n")


def test_unfused_dynamic_update_slice_charges_the_update_twice():
    # hand-written compiled HLO: a [33, 49152] s32 buffer updated in place with one [1, 49152] row
    text = """HloModule m, is_scheduled=true

ENTRY %main (p0: s32[33,49152], p1: s32[1,49152], p2: s32[]) -> s32[33,49152] {
  %p0 = s32[33,49152]{1,0} parameter(0)
  %p1 = s32[1,49152]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  ROOT %dus = s32[33,49152]{1,0} dynamic-update-slice(%p0, %p1, %p2, %c), metadata={op_name="jit(f)/scatter"}
}
"""
    ops = op_traffic(text)
    assert [(o.opcode, o.bytes) for o in ops] == [("dynamic-update-slice", 2 * 49152 * 4)]


_COND = """HloModule m, is_scheduled=true

%cheap (a0: f32[1024]) -> f32[1024] {
  %a0 = f32[1024]{0} parameter(0)
  ROOT %n = f32[1024]{0} negate(%a0)
}

%costly (b0: f32[1024]) -> f32[1024] {
  %b0 = f32[1024]{0} parameter(0)
  %e = f32[1024]{0} exponential(%b0)
  ROOT %l = f32[1024]{0} log(%e)
}

ENTRY %main (p: pred[], x: f32[1024]) -> f32[1024] {
  %p = pred[] parameter(0)
  %x = f32[1024]{0} parameter(1)
  ROOT %c = f32[1024]{0} conditional(%p, %x, %x), branch_computations={%cheap, %costly}
}
"""


@pytest.mark.parametrize("branches,ops", [("min", 1), ("max", 2), ("all", 3)])
def test_conditional_charges_one_branch(branches, ops):
    # each elementwise op reads and writes 1024 f32: 8 KiB
    found = op_traffic(_COND, branches=branches)
    assert len(found) == ops and sum(o.bytes for o in found) == ops * 2 * 1024 * 4
    with pytest.raises(ValueError, match="branches"):
        op_traffic(_COND, branches="first")


# The TPU compiler's pattern for a small cache array it keeps in VMEM for one step (seen in the Llama-3-8B-shaped
# int8-KV step on v5e x 8): prefetch it whole (copy-start into S(1)), update it there, write it back whole
# (copy-start from S(1) to HBM); and a copy-start within HBM (a relayout).
_PREFETCH = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[16384,16]) -> (f32[16384,16], f32[16384,16]) {
  %p = f32[16384,16]{0,1:T(8,128)} parameter(0)
  %in = (f32[16384,16]{0,1:T(8,128)S(1)}, f32[16384,16]{0,1:T(8,128)}, u32[]{:S(2)}) copy-start(%p)
  %v = f32[16384,16]{0,1:T(8,128)S(1)} copy-done(%in)
  %n = f32[16384,16]{0,1:T(8,128)S(1)} negate(%v)
  %out = (f32[16384,16]{0,1:T(8,128)}, f32[16384,16]{0,1:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%n)
  %back = f32[16384,16]{0,1:T(8,128)} copy-done(%out)
  %re = (f32[16384,16]{0,1:T(8,128)}, f32[16384,16]{0,1:T(8,128)}, u32[]{:S(2)}) copy-start(%p)
  %moved = f32[16384,16]{0,1:T(8,128)} copy-done(%re)
  ROOT %t = (f32[16384,16]{0,1:T(8,128)}, f32[16384,16]{0,1:T(8,128)}) tuple(%back, %moved)
}
"""


def test_async_copies_charge_their_hbm_ends():
    size = 16384 * 16 * 4
    ops = {o.name: o.bytes for o in op_traffic(_PREFETCH)}
    # the prefetch reads the array from HBM, the write-back writes it (its source is in VMEM), a copy within HBM
    # does both; the update between them runs in VMEM and moves no HBM bytes
    assert ops == {"in": size, "out": size, "re": 2 * size}


_ROW_UPDATE = """HloModule m, is_scheduled=true

ENTRY %main (r: s32[32], l: s32[32], u: f32[32,128], m: s32[32,128], s: f32[2048,128]) -> f32[2048,128] {
  %r = s32[32]{0:T(128)} parameter(0)
  %l = s32[32]{0:T(128)} parameter(1)
  %u = f32[32,128]{1,0:T(8,128)} parameter(2)
  %m = s32[32,128]{1,0:T(8,128)} parameter(3)
  %s = f32[2048,128]{1,0:T(8,128)} parameter(4)
  %w = f32[2048,128]{1,0:T(8,128)} custom-call(%r, %l, %u, %m, %s), custom_call_target="tpu_custom_call", \
output_to_operand_aliasing={{}: (4, {})}, metadata={op_name="jit(f)/kv_scale_rows_write/pallas_call"}
  ROOT %x = f32[2048,128]{1,0:T(8,128)} custom-call(%r, %l, %u, %m, %w), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(f)/qmm/pallas_call"}
}
"""


def test_in_place_row_update_kernel_charges_its_rows():
    """The TPU scale-row write (its result aliases the scale array) moves the rows it updates, not the array;
    any other custom call is charged its operands and result whole."""
    ops = {o.name: o.bytes for o in op_traffic(_ROW_UPDATE)}
    small = 2 * 32 * 4 + 32 * 128 * 4  # row ids, leader flags, lane mask
    rows = 32 * 128 * 4  # the update rows: read, plus one array row read and written per update row
    assert ops["w"] == small + 3 * rows
    assert ops["x"] == small + rows + 2 * 2048 * 128 * 4
