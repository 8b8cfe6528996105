"""Build the sdist and the wheel, and check that what ships is what the tree holds.

Usage: ``python tests/wheel/build_dists.py OUTDIR`` (the python needs ``build``). Writes
``OUTDIR/dist/`` (``python -m build``: the sdist, then the wheel built from the sdist) and
``OUTDIR/tree/`` (a wheel built straight from a clean copy of the checkout), then checks:

- the wheel holds every file under ``tunnel/`` in the checkout (Python sources, the status
  page's assets at any depth, ``py.typed``) and nothing else besides its ``.dist-info``;
- the wheel built from the sdist equals the wheel built from the tree: the same names, and
  byte for byte the same contents (RECORD included: it lists names, hashes and sizes only).

Prints one line per check and the wheel's path last; exits 1 on the first difference.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGE = "tunnel"
#: What a clean copy of the checkout leaves out at its top: build outputs, environments, caches
#: and VCS data (a stale ``build/lib`` would otherwise be packed into the wheel by setuptools).
TOP_IGNORE = {".git", ".venv", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache",
              ".hypothesis", "test-artifacts", "tunnel-state"}
BUILD_TIMEOUT = 600


def fail(message: str) -> None:
    print(f"dists: FAILED: {message}", flush=True)
    sys.exit(1)


def build(args: list[str], source: Path, outdir: Path) -> None:
    command = [sys.executable, "-m", "build", *args, "--outdir", str(outdir), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            check=False)
    if result.returncode != 0:
        fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")


def ignore(directory: str, names: list[str]) -> set[str]:
    """For :func:`shutil.copytree`: TOP_IGNORE at the top, bytecode everywhere."""
    top = Path(directory).resolve() == CHECKOUT
    return {n for n in names
            if n == "__pycache__" or n.endswith(".pyc")
            or (top and (n in TOP_IGNORE or n.endswith(".egg-info")))}


def one(outdir: Path, pattern: str) -> Path:
    found = sorted(outdir.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {outdir}, found {[p.name for p in found]}")
    return found[0]


def contents(wheel: Path) -> dict[str, str]:
    """Every member's name and the SHA-256 of its bytes."""
    with zipfile.ZipFile(wheel) as archive:
        return {info.filename: hashlib.sha256(archive.read(info)).hexdigest()
                for info in archive.infolist() if not info.is_dir()}


def tree_files() -> set[str]:
    root = CHECKOUT / PACKAGE
    return {
        path.relative_to(CHECKOUT).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    dist, tree_out, copy = out / "dist", out / "tree", out / "src"
    for path in (dist, tree_out, copy):
        shutil.rmtree(path, ignore_errors=True)

    build([], CHECKOUT, dist)
    sdist, wheel = one(dist, "*.tar.gz"), one(dist, "*.whl")
    shutil.copytree(CHECKOUT, copy, ignore=ignore)
    build(["--wheel"], copy, tree_out)
    direct = one(tree_out, "*.whl")
    print(f"dists: built {sdist.name} and {wheel.name} (from the sdist), and a wheel from the "
          "tree", flush=True)

    shipped = contents(wheel)
    package_files = {n for n in shipped if n.split("/", 1)[0] == PACKAGE}
    others = sorted(n for n in shipped if n not in package_files
                    and not n.split("/", 1)[0].endswith(".dist-info"))
    if others:
        fail(f"the wheel holds files outside {PACKAGE}/ and its .dist-info: {others}")
    expected = tree_files()
    if missing := sorted(expected - package_files):
        fail(f"the wheel lacks files of the tree: {missing}")
    if extra := sorted(package_files - expected):
        fail(f"the wheel holds files the tree does not: {extra}")
    data = sorted(n for n in package_files if not n.endswith(".py"))
    print(f"dists: the wheel holds all {len(expected)} files under {PACKAGE}/, "
          f"{len(data)} of them not Python: {', '.join(data)}", flush=True)

    rebuilt = contents(direct)
    if wheel.name != direct.name:
        fail(f"the sdist builds {wheel.name}, the tree {direct.name}")
    if set(shipped) != set(rebuilt):
        fail(f"file lists differ: only from the sdist {sorted(set(shipped) - set(rebuilt))}, "
             f"only from the tree {sorted(set(rebuilt) - set(shipped))}")
    if differ := sorted(n for n in shipped if shipped[n] != rebuilt[n]):
        fail(f"contents differ between the sdist's wheel and the tree's: {differ}")
    print(f"dists: the sdist rebuilds the same wheel ({len(shipped)} files, equal bytes)",
          flush=True)
    print(wheel, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
