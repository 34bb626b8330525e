"""The C++ programs the benchmarks compile (peak.py's FMA loop, ab_kernels.py's paired kernels,
bench_tiles.py's products): each built once per content into the temp directory and reused.

cached_binary(name, key, build) is <temp>/ring_ext_<name>/<hash>/<name>, the hash over key (what the
program is made of: sources, flags, levels) and the compiler's version. When it is absent, build(path)
writes the program to a path of this process's own, which then replaces the cached one whole, so two
runs building at once never see half a binary.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable


def compiler() -> str:
    """The host's C++ compiler: $CXX, else g++."""
    return os.environ.get("CXX", "g++")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tree_digest(tree: str) -> str:
    """A hash of every file under tree, by relative path and content."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(tree)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, tree).encode() + b"\0" + read(path) + b"\0")
    return digest.hexdigest()


def cached_binary(name: str, key: bytes, build: Callable[[str], None]) -> str:
    """The path of program `name` made of `key`, built by build(path) unless cached."""
    version = subprocess.run([compiler(), "--version"], check=True, capture_output=True).stdout
    digest = hashlib.sha256(version + b"\0" + key).hexdigest()[:16]
    binary = os.path.join(tempfile.gettempdir(), f"ring_ext_{name}", digest, name)
    if not os.path.exists(binary):
        os.makedirs(os.path.dirname(binary), exist_ok=True)
        partial = f"{binary}.{os.getpid()}"
        build(partial)
        os.replace(partial, binary)
    return binary
