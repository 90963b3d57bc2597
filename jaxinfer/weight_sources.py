"""Readers for checkpoint files: memory-mapped safetensors and GGUF.

Both expose tensors by name as lazily materialised numpy arrays in HF orientation (``[out, in]`` for
linear weights), so the loader can read one tensor (or one shard's slice) at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxinfer.errors import UnsupportedModelError, WeightLoadError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """Zero-copy view of one ``.safetensors`` file (header parsed, data memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds file size {size}")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise WeightLoadError(f"{self.path}: not a valid safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._entries = header
        data_len = size - self._base
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _ST_DTYPES:
                raise UnsupportedModelError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
            if end > data_len:
                raise WeightLoadError(
                    f"{self.path}: truncated: tensor {name} ends at byte {end} but the data section has "
                    f"{data_len} bytes"
                )
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array in its stored dtype."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self._base + begin : self._base + end]
        return raw.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsCheckpoint:
    """All ``*.safetensors`` files of an HF model directory (sharded index or single file)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise WeightLoadError(f"{directory}: no *.safetensors files (only safetensors checkpoints "
                                  "are supported for HF directories)")
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            f = SafetensorsFile(path)
            for k in f.keys():
                self._where[k] = f
        self.bytes_read = 0  # bytes of tensor data read through read(), since opening

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def nbytes(self, name: str) -> int:
        return self._where[name].nbytes(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_ST_DTYPES[self._where[name]._entries[name]["dtype"]])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A copy of ``tensor[index]`` (one slice per stored axis); only that region is read from the file
        (page-granular through the memory map)."""
        region = np.array(self.get(name)[index])
        self.bytes_read += region.nbytes
        return region


def write_safetensors(path: str | Path, tensors: dict) -> None:
    """Write ``tensors`` (name -> numpy or fully addressable ``jax.Array``, dtypes of :data:`_ST_DTYPES`) as one
    safetensors file, one tensor in host memory at a time."""
    codes = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for name, a in tensors.items():
        dtype = np.dtype(a.dtype)
        if dtype not in codes:
            raise WeightLoadError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(a.shape)) * dtype.itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, a in tensors.items():
            if not getattr(a, "is_fully_addressable", True):
                raise WeightLoadError(f"tensor {name} spans several processes; save from one process")
            f.write(np.ascontiguousarray(np.asarray(a)).tobytes())


GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class GGUFCheckpoint:
    """Tensors and metadata of a GGUF file, dequantized on access with the ``gguf`` package."""

    SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not is_gguf(self.path):
            raise WeightLoadError(f"{self.path}: not a GGUF file (bad magic)")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises assorted errors on damaged files
            raise WeightLoadError(f"{self.path}: corrupted or truncated GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.bytes_read = 0  # bytes of tensor data read through read(), since opening
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise WeightLoadError(f"{self.path}: truncated: tensor {t.name} extends past the end of file")

    def metadata(self) -> dict:
        """GGUF key/values as Python values (token lists excluded for speed)."""
        out = {}
        for k, field in self.reader.fields.items():
            if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores"):
                out[k] = range(len(field.data))  # length only
                continue
            try:
                out[k] = field.contents()
            except Exception:  # a field type the gguf package cannot decode: not needed by us
                continue
        return out

    def keys(self) -> set[str]:
        return set(self.tensors)

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """Numpy order: ``[rows, cols]`` = HF ``[out, in]``."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].n_bytes)

    def get(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in numpy order (``[rows, cols]`` = HF ``[out, in]``)."""
        return self.read(name, tuple(slice(None) for _ in self.shape(name)))

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Dequantized float32 ``tensor[index]`` (numpy order, one unit-step slice per axis). Only the rows of
        ``index`` are read; of a quantized tensor's columns, the blocks that hold them."""
        import gguf

        t = self.tensors[name]
        ttype = t.tensor_type.name
        if ttype not in self.SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has GGUF type {ttype}; "
                f"supported: {', '.join(self.SUPPORTED_TYPES)}"
            )
        shape = self.shape(name)
        *lead, (c0, c1, _) = [s.indices(n) for s, n in zip(index, shape)]
        rows = tuple(slice(a, b) for a, b, _ in lead)
        data = t.data.reshape(*shape[:-1], -1)  # last axis: elements (float types) or bytes (quantized)
        per_elem = data.shape[-1] / shape[-1]
        if per_elem == 1:
            raw, offset = data[(*rows, slice(c0, c1))], 0
        else:
            block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
            b0, b1 = c0 // block, -(-c1 // block)
            raw, offset = data[(*rows, slice(b0 * block_bytes, b1 * block_bytes))], c0 - b0 * block
        self.bytes_read += raw.nbytes
        arr = np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw), t.tensor_type), dtype=np.float32)
        return arr[..., offset : offset + c1 - c0]

    def read_blocks(self, name: str, rows: tuple[int, int], blocks: tuple[int, int]) -> np.ndarray:
        """The raw quantization blocks ``blocks`` (``[b0, b1)``, along each row) of stored rows ``rows``
        (``[r0, r1)``) of a 2-D block-quantized tensor: ``uint8[r1 - r0, b1 - b0, block bytes]``, copied
        from the memory map (only that region is read)."""
        import gguf

        t = self.tensors[name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        n, k = self.shape(name)
        if block == 1 or k % block or t.data.shape != (n, k // block * block_bytes):
            raise WeightLoadError(f"{self.path}: tensor {name} ({t.tensor_type.name}, {n} x {k}) is not stored "
                                  f"as whole {block}-value blocks of {block_bytes} bytes per row")
        (r0, r1), (b0, b1) = rows, blocks
        raw = np.array(t.data[r0:r1, b0 * block_bytes : b1 * block_bytes])
        self.bytes_read += raw.nbytes
        return raw.reshape(r1 - r0, b1 - b0, block_bytes)
