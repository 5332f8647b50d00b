"""flashattn_cupy's compiled kernels on disk: storing and reading them back, which variants the
directory holds, and removing them (`python -m flashattn_cupy info` and `clear-cache`).

Our kernels live in CuPy's kernel cache directory (CUPY_CACHE_DIR), one file a variant, named
flashattn_cupy_<SHA-256 of source, name expression, options, CuPy and CUDA versions>.cubin and
holding MAGIC, a SHA-256 of the rest, the kernel's mangled name and the cubin (pack/unpack).
kernels.py writes and reads them itself rather than through CuPy's cache: CuPy's hit path runs
NVRTC once per option set to build its cache key, ours needs no NVRTC (two kernels loaded in a new
process: 7-8 ms against CuPy's 27-45, an H200, BENCHMARKS.md).

Files are recognized by content, not name: a cubin's symbol table keeps every kernel's mangled
name, e.g. _Z13flash_fwd_mmaIfLi64ELi4ELi2ELi64ELi0ELi80ELi3EEv... for
flash_fwd_mma<float, 64, 4, 2, 64, 0, 80, 3>, and the template arguments read back into the
planner's name expression. That finds our own files and the ones CuPy's cache kept of our
kernels before (a hash, then the cubin, or, from CuPy 14.2, the mangled names and then the
cubin). Files holding none of our kernels are never touched, except by clear(everything=True).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

from .kernels import SOURCES

# _Z <length><name> I <template arguments> E: a function template instance (Itanium ABI)
_MANGLED = re.compile(rb"_Z(\d+)(" + b"|".join(re.escape(f.encode()) for f in SOURCES) + rb")I([0-9A-Za-z_]+)")
_BUILTIN = {"f": "float", "d": "double", "i": "int", "j": "unsigned int", "b": "bool"}


class KernelCacheWarning(RuntimeWarning):
    """CuPy's kernel cache directory could not be used; kernels were compiled without it."""


def cache_dir() -> Path:
    """Where CuPy keeps compiled kernels (its CUPY_CACHE_DIR, by default ~/.cupy/kernel_cache)."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


MAGIC = b"flashattn_cupy cubin 1\n"


def file_name(*key: str) -> str:
    """The file of the kernel that key (source, name expression, options, versions) identifies."""
    return "flashattn_cupy_" + hashlib.sha256("\0".join(key).encode()).hexdigest() + ".cubin"


def pack(mangled: str, cubin: bytes) -> bytes:
    name = mangled.encode()
    payload = struct.pack("<I", len(name)) + name + cubin
    return MAGIC + hashlib.sha256(payload).digest() + payload


def unpack(data: bytes) -> tuple[str, bytes] | None:
    """(mangled name, cubin), or None where data is not a whole file pack() wrote."""
    start = len(MAGIC) + 32
    if len(data) < start + 4 or not data.startswith(MAGIC):
        return None
    payload = data[start:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):start]:
        return None                                  # truncated, garbled, or half written
    (length,) = struct.unpack_from("<I", payload)
    return payload[4:4 + length].decode(errors="replace"), payload[4 + length:]


def read(path: Path) -> tuple[str, bytes] | None:
    """The stored kernel at path, None if there is none to use (missing, unreadable, damaged)."""
    try:
        return unpack(path.read_bytes())
    except OSError:
        return None


def write(path: Path, data: bytes) -> OSError | None:
    """Store data at path whole or not at all (a temporary file renamed over it, so a reader in
    another process never sees half a file); the error, if the directory refused it."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)   # CUPY_CACHE_DIR may have changed since CuPy's import
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".flashattn_cupy_", delete=False) as f:
            temporary = Path(f.name)
            f.write(data)
        os.replace(temporary, path)
        return None
    except OSError as e:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return e


def ensure_cache_dir() -> Path:
    """CuPy's kernel cache directory, created if missing, for use before CuPy is imported.

    CuPy 14.2 creates the directory when it is imported, and `import cupy` fails if it cannot
    (a file in the way, a read-only home). Then a temporary directory takes its place for this
    process (as CUPY_CACHE_DIR, inherited by its children; removed at exit), with a
    KernelCacheWarning that says how to keep compiled kernels across runs."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as e:
        temporary = Path(tempfile.mkdtemp(prefix="flashattn_cupy_kernel_cache_"))
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        os.environ["CUPY_CACHE_DIR"] = str(temporary)
        warnings.warn(f"CuPy's kernel cache directory {path} cannot be created ({type(e).__name__}: {e}); "
                      f"this process caches compiled kernels in {temporary} instead, removed at exit, so the next "
                      "run compiles them again. Point CUPY_CACHE_DIR to a writable directory to keep them.",
                      KernelCacheWarning, stacklevel=2)
        return temporary


def _template_args(mangled: str) -> list[str] | None:
    """The template arguments of a mangled argument list (after the I), None if any is of a form
    our kernels do not use: literals L<type><value>E, builtin types and plain class names."""
    args: list[str] = []
    pos = 0
    while pos < len(mangled):
        c = mangled[pos]
        if c == "E":
            return args
        if c == "L" and (literal := re.match(r"L([ijb])(n?\d+)E", mangled[pos:])):
            kind, value = literal.groups()
            value = value.replace("n", "-")
            args.append(("false", "true")[int(value)] if kind == "b" else value)
            pos += literal.end()
        elif c in _BUILTIN:
            args.append(_BUILTIN[c])
            pos += 1
        elif name := re.match(r"(\d+)", mangled[pos:]):
            length = int(name.group(1))
            start = pos + name.end()
            args.append(mangled[start:start + length])
            pos = start + length
        else:
            return None
    return None


def variants(data: bytes) -> list[str]:
    """The name expressions of flashattn_cupy's kernels whose mangled names occur in data."""
    found = set()
    for match in _MANGLED.finditer(data):
        length, family, rest = int(match.group(1)), match.group(2).decode(), match.group(3).decode()
        args = _template_args(rest) if length == len(family) else None
        if args:
            found.add(f"{family}<{', '.join(args)}>")
    return sorted(found)


def scan(path: Path | None = None) -> dict[Path, list[str]]:
    """Every file of the cache directory and our kernel variants in it ([] for other files)."""
    path = cache_dir() if path is None else path
    if not path.is_dir():
        return {}
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {p: variants(p.read_bytes()) for p in files}


def ours(contents: dict[Path, list[str]]) -> list[Path]:
    """Our cache files, with the CUDA source CuPy may have saved beside each (<file>.cu)."""
    cubins = [p for p, found in contents.items() if found]
    return cubins + [p.with_name(p.name + ".cu") for p in cubins if p.with_name(p.name + ".cu") in contents]


def clear(everything: bool = False, path: Path | None = None) -> list[Path]:
    """Remove flashattn_cupy's files from the cache directory (every file with everything=True);
    returns what was removed. A removed kernel is compiled again on its next use."""
    contents = scan(path)
    doomed = list(contents) if everything else ours(contents)
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def _size(paths: list[Path]) -> str:
    return f"{sum(p.stat().st_size for p in paths) / 2**20:.1f} MB"


def report_lines() -> list[str]:
    """The kernel-cache part of `info`: the directory, then our variants in it."""
    path = cache_dir()
    if not path.is_dir():
        return [f"Kernel cache: {path} (not created yet: no kernel compiled on this machine)"]
    contents = scan(path)
    if not contents:
        return [f"Kernel cache: {path} (empty)"]
    lines = [f"Kernel cache: {path} ({len(contents)} files, {_size(list(contents))})"]
    mine = ours(contents)
    if not mine:
        return lines + ["  none of them is flashattn_cupy's (a variant is compiled and cached on its first use)"]
    files_of: dict[str, int] = {}
    for found in contents.values():
        for name in found:
            files_of[name] = files_of.get(name, 0) + 1
    lines.append(f"  flashattn_cupy's: {len(files_of)} variants in {len(mine)} files ({_size(mine)}), "
                 "read from the kernel names inside the files (CuPy names them by hash); "
                 "`python -m flashattn_cupy clear-cache` removes them")
    lines += [f"    {name}" + (f" ({n} files: compiled for {n} devices, compilers or CuPy versions)" if n > 1 else "")
              for name, n in sorted(files_of.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m flashattn_cupy clear-cache",
        description="Remove flashattn_cupy's compiled kernels from CuPy's kernel cache directory "
                    "(CUPY_CACHE_DIR, by default ~/.cupy/kernel_cache), found by the kernel names inside "
                    "the files; other kernels stay. A removed variant is compiled again on its next use.")
    parser.add_argument("--all", action="store_true",
                        help="remove every file in the directory: CuPy's whole kernel cache, other libraries' too")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    path = cache_dir()
    contents = scan(path)
    if not contents:
        print(f"{path}: {'no such directory' if not path.is_dir() else 'empty'}; nothing to remove")
        return 0
    doomed = list(contents) if args.all else ours(contents)
    what = "files (CuPy's whole kernel cache)" if args.all else "files of flashattn_cupy's kernels"
    size = _size(doomed)
    if args.dry_run:
        print(f"Would remove {len(doomed)} {what} from {path} ({size}):")
        print("\n".join(f"  {p.name}" + (f": {', '.join(contents[p])}" if contents.get(p) else "") for p in doomed))
    else:
        removed = clear(args.all, path)
        print(f"Removed {len(removed)} {what} from {path} ({size})")
    kept = len(contents) - len(doomed)
    if kept:
        print(f"{kept} other files {'would stay' if args.dry_run else 'left'} (other kernels); "
              "--all removes those too")
    return 0
