"""DeepSpeed's JIT-built ops without torch's extension lock: built once ahead of time, copied per process.

On the CPU, ``deepspeed.initialize`` builds DeepSpeed's shared-memory comm op through
``torch.utils.cpp_extension.load``, which holds a lock file (``<TORCH_EXTENSIONS_DIR>/<op>/lock``) while
it runs ninja — even when the op is already built. A process killed while holding it leaves the file
behind and every later load on that directory waits on it forever. So ltdist never loads from a shared
directory:

- :func:`ensure_prebuilt` builds the ops into ``<sys.prefix>/ltdist-torch-extensions/`` (``make install``
  runs ``python -m ltdist.engine.ds_ops``). It builds under an ``fcntl`` lock, which the kernel releases
  when its holder dies, and clears torch lock files left there by a killed builder first.
- :func:`isolate_torch_extensions` imports each prebuilt op's library itself and registers it in
  DeepSpeed's op cache (``OpBuilder._loaded_ops``), so ``builder.load()`` returns it and torch's JIT
  loader never runs: no lock, no ninja, no compiler. Copying the build directory was not enough: the
  loader re-runs ninja in every new process, and ninja rebuilt both sources (about 2 minutes per rank on
  2 cores). The process still gets its own ``TORCH_EXTENSIONS_DIR``, seeded with a copy of the prebuilt
  ops, for any op that is not preloaded; a lock left there by a killed process dies with that process's
  directory; directories of dead processes are pruned.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton name inside each op's build directory


def _tag() -> str:
    import deepspeed
    import torch

    # DeepSpeed's version too: a prebuilt library from other sources must not be imported after an upgrade.
    return f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_ds{deepspeed.__version__}"


def prebuilt_root() -> Path:
    """Where :func:`ensure_prebuilt` keeps the built ops: next to the interpreter, per Python/torch version."""
    return Path(sys.prefix) / "ltdist-torch-extensions" / _tag()


def _needed_builders() -> list:
    """DeepSpeed op builders that ``deepspeed.initialize`` JIT-loads on this accelerator (the CPU's
    shared-memory comm op; none on CUDA, where the comm goes through NCCL)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    return [builder]


def stale_locks(root: Path) -> list[Path]:
    """Torch extension lock files under ``root`` (one level of op directories)."""
    return sorted(root.glob(f"*/{TORCH_LOCK}")) if root.is_dir() else []


def ensure_prebuilt(root: Path | None = None) -> Path:
    """Build every op :func:`_needed_builders` lists into ``root`` (default :func:`prebuilt_root`) unless
    already there; return ``root``. Safe to run from many processes at once."""
    root = root or prebuilt_root()
    builders = _needed_builders()
    root.mkdir(parents=True, exist_ok=True)
    missing = [b for b in builders if _library(root, b) is None]
    if not missing:
        return root
    with open(root / ".ltdist-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if we die: no stale state possible
        for stale in stale_locks(root):  # we hold the build lock: a torch lock here belongs to a dead builder
            log.warning("removing %s, left by a killed build", stale)
            stale.unlink()
        previous = os.environ.get("TORCH_EXTENSIONS_DIR")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
        try:
            for builder in missing:
                log.info("building DeepSpeed op %s into %s (once per installation)", builder.NAME, root)
                builder.jit_load(verbose=False)
        finally:
            if previous is None:
                os.environ.pop("TORCH_EXTENSIONS_DIR", None)
            else:
                os.environ["TORCH_EXTENSIONS_DIR"] = previous
    return root


def _library(root: Path, builder) -> Path | None:
    found = sorted((root / builder.NAME).glob(f"{builder.NAME}*.so"))
    return found[0] if found else None


def preload_prebuilt(root: Path) -> list[str]:
    """Import the library of every needed op from ``root`` and register it in DeepSpeed's op cache, so that
    ``deepspeed.initialize`` takes it from there instead of calling torch's JIT loader. Returns the names
    registered now (ops already loaded in this process are left as they are)."""
    registered = []
    for builder in _needed_builders():
        if builder.name in builder._loaded_ops:
            continue
        library = _library(root, builder)
        if library is None:
            raise FileNotFoundError(f"DeepSpeed op {builder.NAME} is not built in {root}: run "
                                    "`python -m ltdist.engine.ds_ops`")
        spec = importlib.util.spec_from_file_location(builder.NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        builder._loaded_ops[builder.name] = module  # the class-level cache OpBuilder.load() consults first
        registered.append(builder.NAME)
    return registered


def _prune_dead(parent: Path) -> None:
    for path in parent.glob("pid*-*"):
        pid = path.name[3:].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def isolate_torch_extensions() -> Path:
    """Register the prebuilt ops (built first if missing) in DeepSpeed's op cache, and point
    ``TORCH_EXTENSIONS_DIR`` at a directory of this process only, seeded with a copy of them; removed at
    exit. Idempotent within a process. Returns the directory."""
    current = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    if current and Path(current).name.startswith(f"pid{os.getpid()}-"):
        return Path(current)
    parent = Path(tempfile.gettempdir()) / f"ltdist-torch-extensions-{os.getuid()}"
    parent.mkdir(parents=True, exist_ok=True)
    try:
        source = ensure_prebuilt()
    except PermissionError:  # a read-only installation that nobody prebuilt: a per-user copy on this node
        log.warning("cannot build into %s (read-only); building DeepSpeed's ops under %s instead (run "
                    "`python -m ltdist.engine.ds_ops` at install time to avoid this)", prebuilt_root(), parent)
        source = ensure_prebuilt(parent / "prebuilt" / _tag())
    preload_prebuilt(source)
    _prune_dead(parent)
    private = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=parent))
    shutil.copytree(source, private, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TORCH_LOCK, ".ltdist-*"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(private)
    return private


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = ensure_prebuilt()
    print(f"DeepSpeed ops prebuilt in {root}: {sorted(p.name for p in root.iterdir() if p.is_dir()) or 'none needed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
