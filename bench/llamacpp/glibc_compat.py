"""Make llama-cpp-py-sync's prebuilt libraries load on glibc < 2.38 (e.g. Debian 12, glibc 2.36).

The wheel is tagged manylinux2014 but its libraries reference four C23 functions that glibc added in 2.38
(``__isoc23_strtol`` / ``strtoul`` / ``strtoull`` / ``sscanf``: the same as the classic ones, plus
``0b`` prefixes). This script (run by setup.sh with the environment's python) compiles a shim library
that defines them by calling the classic functions, adds it to each library's needed list (patchelf), drops
the symbols' version tags and marks the ``GLIBC_2.38`` version requirement weak (``VER_FLG_WEAK``), so the
dynamic loader binds the symbols to the shim instead of refusing to load. Nothing changes on glibc >= 2.38.

Usage: ``python glibc_compat.py PACKAGE_DIR PATCHELF``
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char* s, char** e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char* s, char** e, int b) { return strtoul(s, e, b); }
long long __isoc23_strtoll(const char* s, char** e, int b) { return strtoll(s, e, b); }
unsigned long long __isoc23_strtoull(const char* s, char** e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char* s, const char* f, ...) {
  va_list a;
  va_start(a, f);
  int r = vsscanf(s, f, a);
  va_end(a);
  return r;
}
"""
WANT = b"GLIBC_2.38"


def weaken_version(path: Path) -> int:
    """Set VER_FLG_WEAK on every GLIBC_2.38 entry of ``path``'s .gnu.version_r; returns how many."""
    b = bytearray(path.read_bytes())
    shoff = struct.unpack_from("<Q", b, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]

    def name(off: int) -> bytes:
        return bytes(b[off:b.index(0, off)])

    by_name = {name(secs[shstrndx][4] + s[0]): s for s in secs}
    if b".gnu.version_r" not in by_name:
        return 0
    off, dynstr, n = by_name[b".gnu.version_r"][4], by_name[b".dynstr"][4], 0
    while True:
        _, count, _, aux, nxt = struct.unpack_from("<HHIII", b, off)
        a = off + aux
        for _ in range(count):
            _, flags, _, vname, anext = struct.unpack_from("<IHHII", b, a)
            if name(dynstr + vname) == WANT:
                struct.pack_into("<H", b, a + 4, flags | 2)
                n += 1
            a += anext
        if not nxt:
            break
        off += nxt
    path.write_bytes(bytes(b))
    return n


def main() -> None:
    pkg, patchelf = Path(sys.argv[1]), sys.argv[2]
    libs = [p for p in sorted(pkg.glob("lib*.so*")) if not p.is_symlink() and "shim" not in p.name]
    needing = []
    for lib in libs:
        syms = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True, check=True).stdout
        c23 = sorted({ln.split()[-1] for ln in syms.splitlines() if "GLIBC_2.38" in ln})
        if c23:
            needing.append((lib, c23))
    if not needing:
        print("no GLIBC_2.38 references: nothing to do")
        return
    shim = pkg / "libisoc23shim.so"
    src = pkg / "isoc23shim.c"
    src.write_text(SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(src)], check=True)
    for lib, syms in needing:
        for s in syms:
            subprocess.run([patchelf, "--clear-symbol-version", s, str(lib)], check=True)
        subprocess.run([patchelf, "--add-needed", shim.name, str(lib)], check=True)
        print(f"{lib.name}: {' '.join(syms)}; weak GLIBC_2.38 entries: {weaken_version(lib)}")


if __name__ == "__main__":
    main()
