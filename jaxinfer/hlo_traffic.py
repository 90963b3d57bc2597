"""Per-op HBM traffic of a compiled XLA program, read from its optimized HLO text.

``compiled.cost_analysis()["bytes accessed"]`` gives one number for a whole program; to see *which* ops carry
bytes beyond the minimum, :func:`op_traffic` walks the compiled module (``compiled.as_text()``) and charges
every top-level instruction with the bytes of its operands and results that live in device memory (HBM):

* buffers placed in another memory space (a layout with ``S(n)``, n > 0: TPU VMEM / SMEM, prefetched
  copies) are on-chip and not charged; an asynchronous copy (``copy-start``) is charged its HBM ends: the
  source of a prefetch into VMEM, the destination of a write-back from VMEM (a buffer the compiler kept
  in VMEM and updated there is written back whole), both of a copy within HBM;
* a fusion reads a parameter only through a gather / slice / dynamic-slice inside it: charged the sliced
  bytes, not the whole parameter (an embedding lookup reads its rows, not the table);
* a fusion whose root updates a parameter in place (scatter, dynamic-update-slice): charged the update,
  not the whole buffer twice (a KV-cache write); an unfused dynamic-update-slice / scatter likewise:
  the update read and written (plus a scatter's indices);
* one branch of each conditional (the costliest by default, or the cheapest: the plain path);
* while loops count their body once (the trip count is not in the text); custom calls (Pallas kernels)
  are charged their operands and results as the program passes them (right for a quantized-matmul kernel,
  which reads its whole weight); a paged-attention kernel's whole cache operand is *not* what it reads,
  so :class:`OpBytes` marks it ``kernel=True`` and callers account for its page reads separately; a
  row-update kernel (the TPU KV scale-row write, ``row_updates``) whose result aliases its operand is
  charged its other operands plus, per row of its update operand (same dtype and row width as the aliased
  one), one row read and written, not the whole aliased array.

The figures are an estimate in the compiler's own terms (the same buffers it places), meant to find where
traffic goes; ``bytes accessed`` stays the headline number.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "s4": 0.5,
    "u4": 0.5,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_SKIP = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "copy-done",
    "slice-done",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "opt-barrier",
    "custom-call-done",
    "async-done",
}
_SLICING = {"gather", "dynamic-slice", "slice"}
_INPLACE = {"scatter", "dynamic-update-slice"}


def _array_bytes(text: str, *, hbm_only: bool = True) -> int:
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            if dtype.startswith("f8"):
                size = 1
            else:
                continue
        else:
            size = _DTYPE_BYTES[dtype]
        if hbm_only and layout and re.search(r"S\(([1-9][0-9]*)\)", layout):
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * size
    return int(total)


@dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text inside the call's parentheses
    attrs: str  # the text after them
    root: bool


def _split_operands(rest: str) -> tuple[list[str], str, str]:
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    args = rest[: i - 1]
    return re.findall(r"%([\w.\-]+)", args), args, rest[i:]


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """``(computations by name, entry name)`` of an HLO module's text."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            operands, args, attrs = _split_operands(m.group(5))
            current.append(_Instr(m.group(2), m.group(3), m.group(4), operands, args, attrs, bool(m.group(1))))
    if not entry:
        raise ValueError("parse_hlo: no ENTRY computation in the text")
    return comps, entry


@dataclass
class OpBytes:
    """HBM bytes one top-level instruction moves (reads + writes), with its source op name."""

    name: str
    opcode: str
    op_name: str
    bytes: int
    kernel: bool = False


def _param_names(fused: list[_Instr]) -> list[str]:
    """Parameter instruction names of a fused computation, in parameter-number order."""
    numbered = sorted((int(i.args), i.name) for i in fused if i.opcode == "parameter")
    return [n for _, n in numbered]


def _fusion_bytes(fused: list[_Instr], operand_shapes: list[str], out_shape: str) -> int:
    by_name = {i.name: i for i in fused}
    users: dict[str, list[_Instr]] = defaultdict(list)
    for i in fused:
        for o in i.operands:
            users[o].append(i)
    root = next((i for i in fused if i.root), fused[-1])
    roots = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    inplace = {r.operands[0] for r in roots if r.opcode in _INPLACE and r.operands}
    total = 0
    for idx, pname in enumerate(_param_names(fused)):
        shape = operand_shapes[idx] if idx < len(operand_shapes) else ""
        if pname in inplace or not _array_bytes(shape):
            continue
        us = users.get(pname, [])
        if us and all(u.opcode in _SLICING and u.operands[0] == pname for u in us):
            total += sum(_array_bytes(u.shape, hbm_only=False) for u in us)
        else:
            total += _array_bytes(shape)
    for r in roots:
        if r.opcode in _INPLACE and r.operands[0] in inplace:
            upd = r.operands[2] if r.opcode == "scatter" else r.operands[1]
            total += _array_bytes(by_name[upd].shape, hbm_only=False) if upd in by_name else 0
        elif r.opcode not in _INPLACE:
            total += _array_bytes(r.shape) if _array_bytes(out_shape) else 0
    return total


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    return m.group(1) if m else ""


def _row_update_bytes(ins: _Instr, operand_shapes: list[str]) -> int | None:
    """Bytes of an in-place row-update custom call (see the module docstring), or None when its result
    aliases no operand."""
    m = re.search(r"output_to_operand_aliasing=\{\{\}: \((\d+), \{\}\)\}", ins.attrs)
    if not m:
        return None
    aliased = int(m.group(1))
    dtype, dims, _ = _ARRAY.findall(ins.shape)[0]
    total = 0
    for idx, shape in enumerate(operand_shapes):
        if idx == aliased:
            continue
        found = _ARRAY.findall(shape)
        rows = found and found[0][0] == dtype and found[0][1].split(",")[-1:] == dims.split(",")[-1:]
        total += (3 if rows else 1) * _array_bytes(shape)  # update rows: read, plus a row read and written each
    return total


def op_traffic(hlo_text: str, data_dependent: tuple[str, ...] = ("paged_attention",),
               branches: str = "max", row_updates: tuple[str, ...] = ("kv_scale_rows_write",)) -> list[OpBytes]:
    """HBM bytes of every top-level instruction of a compiled module (``compiled.as_text()``), biggest
    first; while / call bodies are walked (once each). Instructions whose source op name contains one of
    ``data_dependent`` (the paged-attention kernels, which read only the pages a step needs) are marked
    ``kernel=True``. Custom calls whose source op name contains one of ``row_updates`` and whose result
    aliases an operand are charged as in-place row updates (:func:`_row_update_bytes`).

    ``branches``: which branch of each ``conditional`` is charged (one runs per execution): ``"max"`` the
    one moving the most bytes (an upper bound of the step), ``"min"`` the one moving the fewest (the plain
    path: optional work such as penalties, top-k / top-p filtering, sampled rather than greedy tokens or
    prompt logprobs skipped), ``"all"`` every branch.
    """
    if branches not in ("max", "min", "all"):
        raise ValueError(f"branches must be 'max', 'min' or 'all', got {branches!r}")
    comps, entry = parse_hlo(hlo_text)

    def walk(comp: str, seen: frozenset[str]) -> list[OpBytes]:
        if comp in seen or comp not in comps:
            return []
        seen = seen | {comp}
        out: list[OpBytes] = []
        shapes = {i.name: i.shape for i in comps[comp]}
        for ins in comps[comp]:
            if ins.opcode in _SKIP:
                continue
            if ins.opcode == "conditional":
                arms = [walk(c, seen) for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs)
                        for c in re.findall(r"%([\w.\-]+)", group)]
                arms += [walk(c, seen) for c in re.findall(r"(?:true|false)_computation=%([\w.\-]+)", ins.attrs)]
                if branches == "all":
                    out.extend(o for arm in arms for o in arm)
                elif arms:
                    pick = max if branches == "max" else min
                    out.extend(pick(arms, key=lambda arm: sum(o.bytes for o in arm)))
                continue
            if ins.opcode in ("while", "call", "async-start", "call-start"):
                for callee in re.findall(r"(?:body|to_apply|calls)=%([\w.\-]+)", ins.attrs):
                    out.extend(walk(callee, seen))
                continue
            operand_shapes = [shapes.get(o, "") for o in ins.operands]
            kernel = any(k in _op_name(ins.attrs) for k in data_dependent)
            if ins.opcode == "fusion":
                m = re.search(r"calls=%([\w.\-]+)", ins.attrs)
                b = _fusion_bytes(comps.get(m.group(1), []), operand_shapes, ins.shape) if m else 0
            elif ins.opcode == "slice-start":  # ((source), destination slice, ...): the slice moves
                b = _array_bytes(_ARRAY.findall(ins.shape)[1][0] + "[" + _ARRAY.findall(ins.shape)[1][1] + "]")
            elif ins.opcode == "copy-start":  # (destination, source, ...): the source read, the destination written
                dtype, dims, layout = _ARRAY.findall(ins.shape)[0]
                b = sum(_array_bytes(s) for s in operand_shapes) + _array_bytes(f"{dtype}[{dims}]{layout}")
            elif ins.opcode in _INPLACE and len(operand_shapes) > 2:  # in place: the update read and written
                if ins.opcode == "scatter":  # (operand, indices, updates)
                    b = _array_bytes(operand_shapes[1]) + 2 * _array_bytes(operand_shapes[2])
                else:  # (operand, update, start indices...)
                    b = 2 * _array_bytes(operand_shapes[1])
            else:
                b = None
                if ins.opcode == "custom-call" and any(k in _op_name(ins.attrs) for k in row_updates):
                    b = _row_update_bytes(ins, operand_shapes)
                if b is None:
                    b = sum(_array_bytes(s) for s in operand_shapes) + _array_bytes(ins.shape)
            if b:
                out.append(OpBytes(ins.name, ins.opcode, _op_name(ins.attrs), b, kernel))
        return out

    return sorted(walk(entry, frozenset()), key=lambda o: -o.bytes)


def traffic_by_source(ops: list[OpBytes], depth: int = 0) -> dict[str, int]:
    """Bytes summed per source op name with its layer index removed (``layers_7/mlp/...`` ->
    ``layers_*/mlp/...``), biggest first; ``depth`` > 0 keeps only that many trailing path parts."""
    acc: dict[str, int] = defaultdict(int)
    for o in ops:
        key = re.sub(r"layers_\d+", "layers_*", o.op_name.removeprefix("jit(_step_fn)/")) or o.opcode
        if depth:
            key = "/".join(key.split("/")[-depth:])
        acc[f"{key} [{o.opcode}{', kernel' if o.kernel else ''}]"] += o.bytes
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))
