"""The wheels a GPU node lacks, carried in the working tree (``make gpu-bundle`` here, installed by ``make gpu-check``).

A cluster's GPU node often has its own CUDA build of torch and Triton but not the rest of ltdist's stack
(DeepSpeed, webdataset, submitit, OmegaConf), and no network. So, where pip reaches PyPI::

    python -m ltdist.kernels.gpu_bundle build --out .whl [--python-version 3.12]

downloads the wheels of :data:`ROOTS` and of everything they require, for CPython ``--python-version`` on
manylinux x86-64, except torch and Triton (the node's own CUDA builds; pip is never let near them). Versions are the
ones installed in the building environment where they satisfy the requirements (the versions the test
suite ran with), else pip's choice. DeepSpeed publishes no wheel: it is built here from its sdist with no
op compiled ahead of time (``DS_BUILD_OPS=0``: ops are JIT-compiled where they are used), which makes it
``py3-none-any``. ``manifest.json`` records each wheel's distribution, version, sha256 and size, the total,
and each wheel's requirements. On the node, with no network::

    python -m ltdist.kernels.gpu_bundle install --wheels .whl --target runs/gpu_check/site

checks every wheel against the manifest, installs (``pip install --no-index --no-deps --target``) the
wheels whose distribution the running Python lacks at a version the bundle's requirements accept, and
prints the folder to put on ``PYTHONPATH``. The install side uses the standard library only (and pip), so
it runs before anything of the bundle is importable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

# What ltdist's training stack and the GPU check need beyond torch: the four the GPU node lacks, and pytest.
ROOTS = ("deepspeed", "webdataset", "submitit", "omegaconf", "pytest", "pytest-timeout")
NODE_HAS = ("torch", "triton")  # the node's own builds; never carried (pip would fetch the CUDA wheels)
MANIFEST = "manifest.json"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
IMPORTS = ("deepspeed", "webdataset", "submitit", "omegaconf")  # what must import once installed


def canonical(name: str) -> str:
    """PEP 503 name: ``Typing_Extensions`` → ``typing-extensions``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(distribution, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(name).decode()
    headers = text.split("\n\n", 1)[0].splitlines()
    field = {k: v for k, _, v in (h.partition(": ") for h in headers) if k in ("Name", "Version")}
    requires = [h.partition(": ")[2] for h in headers if h.startswith("Requires-Dist: ")]
    return canonical(field["Name"]), field["Version"], requires


# ---- build (here, with pip and packaging) ------------------------------------------------------------------
def _target_env(python_version: str) -> dict[str, str]:
    """The marker environment of CPython ``python_version`` on Linux x86-64 (for Requires-Dist markers)."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "extra": ""}


def _requirements(lines: list[str], python_version: str) -> list[Any]:
    """The ``packaging`` Requirements among ``lines`` that apply on the target without extras."""
    from packaging.requirements import Requirement

    env = _target_env(python_version)
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def _pin(requirement: Any) -> str:
    """``name==<version installed here>`` when that version satisfies ``requirement``, else the requirement."""
    from importlib import metadata

    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        version = None
    if version is not None and requirement.specifier.contains(version, prereleases=True):
        return f"{requirement.name}=={version}"
    return f"{requirement.name}{requirement.specifier}"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _download(pins: list[str], out: Path, python_version: str) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    # PIP_CONSTRAINT of the dev install pins torch for *this* Python; nothing here resolves torch (--no-deps).
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
         "--implementation", "cp", *platforms, "-d", str(out), *pins)


def _build_deepspeed(pin: str, out: Path) -> None:
    """A ``py3-none-any`` DeepSpeed wheel from its sdist, every op left to JIT (against this env's torch)."""
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_BUILD_STRING": ""}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-binary",
                    "deepspeed", "-w", str(out), pin], check=True, env=env)


def build(out: Path, python_version: str) -> dict[str, Any]:
    """Fill ``out`` with the bundle and write its manifest; returns the manifest."""
    from packaging.requirements import Requirement

    out.mkdir(parents=True, exist_ok=True)
    # torch's own requirements are carried too when a bundled wheel needs them (pydantic wants a newer
    # typing-extensions than torch does); the install skips whatever the node already has at an accepted version.
    provided = set(NODE_HAS)
    wanted = {canonical(r): Requirement(r) for r in ROOTS}
    done: dict[str, Path] = {}
    while missing := [r for name, r in wanted.items() if name not in done]:
        have = {wheel_metadata(w)[:2] for w in out.glob("*.whl")}  # a rebuild fetches only what changed
        pins = [p for p in map(_pin, missing) if (canonical(p.partition("==")[0]), p.partition("==")[2]) not in have]
        for pin in pins:
            if canonical(Requirement(pin).name) == "deepspeed":
                _build_deepspeed(pin, out)
        if rest := [p for p in pins if canonical(Requirement(p).name) != "deepspeed"]:
            _download(rest, out, python_version)
        for wheel in sorted(out.glob("*.whl")):
            name, _, requires = wheel_metadata(wheel)
            if name in done or name not in wanted:
                continue
            done[name] = wheel
            for req in _requirements(requires, python_version):
                if canonical(req.name) not in provided:
                    wanted.setdefault(canonical(req.name), req)
    for stray in set(out.glob("*.whl")) - set(done.values()):  # e.g. an older version left by a previous build
        stray.unlink()
    return write_manifest(out, python_version, provided)


def write_manifest(out: Path, python_version: str, provided: set[str]) -> dict[str, Any]:
    wheels = []
    for wheel in sorted(out.glob("*.whl")):
        name, version, requires = wheel_metadata(wheel)
        wheels.append(dict(name=name, version=version, file=wheel.name, sha256=sha256(wheel),
                           size=wheel.stat().st_size, requires=requires))
    deepspeed = next((w for w in wheels if w["name"] == "deepspeed"), None)
    if deepspeed is not None and not deepspeed["file"].endswith("-py3-none-any.whl"):
        raise RuntimeError(f"the DeepSpeed wheel {deepspeed['file']} is not py3-none-any: an op was compiled in")
    manifest = dict(python_version=python_version, platforms=list(PLATFORMS), roots=list(ROOTS),
                    node_provides=sorted(provided), wheels=wheels, total_bytes=sum(w["size"] for w in wheels))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- install (on the node: standard library and pip only) --------------------------------------------------
def read_manifest(wheels: Path) -> dict[str, Any]:
    """The manifest, after checking that every wheel it lists is there with its size and sha256."""
    path = wheels / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no bundle manifest; run `make gpu-bundle` where pip reaches PyPI")
    manifest = json.loads(path.read_text())
    for w in manifest["wheels"]:
        f = wheels / w["file"]
        if not f.is_file() or f.stat().st_size != w["size"] or sha256(f) != w["sha256"]:
            raise ValueError(f"{f}: missing or not the wheel the manifest lists (size/sha256); rebuild the bundle")
    return manifest


def _requirement(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; every Python with pip has it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(line)


def _constraints(manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """Per distribution, the specifiers the bundle's wheels put on it here (markers evaluated for this Python)."""
    out: dict[str, list[Any]] = {}
    for w in manifest["wheels"]:
        for req in map(_requirement, w["requires"]):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                out.setdefault(canonical(req.name), []).append(req.specifier)
    return out


def needed(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's wheels whose distribution this Python lacks, or has at a version the bundle's
    requirements reject (those are installed into the target, which comes first on ``PYTHONPATH``)."""
    from importlib import metadata

    constraints = _constraints(manifest)
    result = []
    for w in manifest["wheels"]:
        try:
            have = metadata.version(w["name"])
        except metadata.PackageNotFoundError:
            result.append(w)
            continue
        if not all(spec.contains(have, prereleases=True) for spec in constraints.get(w["name"], [])):
            result.append(w)
    return result


def _same_python(manifest: dict[str, Any]) -> bool:
    return manifest["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def install(wheels: Path, target: Path, everything: bool = False) -> dict[str, Any]:
    """Install the bundle's wheels this Python needs (``everything``: all of them) into ``target``.

    For a bundle of another Python version (the CPU dry run of a 3.12 bundle), every wheel is unpacked for
    that version (``pip --python-version``), which checks the wheels, not their imports. Returns what was
    installed and skipped; raises CalledProcessError when pip fails."""
    manifest = read_manifest(wheels)
    same = _same_python(manifest)
    chosen = manifest["wheels"] if everything or not same else needed(manifest)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(target)]
    if not same:
        cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", manifest["python_version"],
                *[a for p in manifest["platforms"] for a in ("--platform", p)]]
    if chosen:
        # the global pip configuration may carry constraints and find-links of its own: the bundle alone counts
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""}
        subprocess.run([*cmd, *(str(wheels / w["file"]) for w in chosen)], check=True, env=env)
    names = {w["name"] for w in chosen}
    return dict(python_version=manifest["python_version"], same_python=same, target=str(target),
                installed=[f"{w['name']}=={w['version']}" for w in chosen],
                already_present=sorted(w["name"] for w in manifest["wheels"] if w["name"] not in names),
                total_bytes=manifest["total_bytes"])


def check_imports(target: Path, modules: tuple[str, ...] = IMPORTS, python: str = sys.executable,
                  timeout: float = 300) -> dict[str, Any]:
    """Import ``modules`` in a fresh ``python`` with ``target`` first on ``PYTHONPATH``: versions and paths."""
    code = ("import importlib, json, sys\n"
            "out = {}\n"
            f"for name in {list(modules)!r}:\n"
            "    m = importlib.import_module(name)\n"
            "    out[name] = dict(version=getattr(m, '__version__', None), file=m.__file__)\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"importing {', '.join(modules)} with {target} on PYTHONPATH failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_manifest(manifest: dict[str, Any]) -> None:
    for w in manifest["wheels"]:
        print(f"  {w['file']:<72}{w['size'] / 2**20:>7.2f} MiB")
    print(f"{len(manifest['wheels'])} wheels for CPython {manifest['python_version']}, "
          f"{manifest['total_bytes'] / 2**20:.1f} MiB in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltdist.kernels.gpu_bundle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download/build the wheels (needs PyPI)")
    b.add_argument("--out", type=Path, default=Path(".whl"))
    b.add_argument("--python-version", default="3.12", help="the GPU node's CPython, MAJOR.MINOR")
    i = sub.add_parser("install", help="install the wheels this Python lacks into --target (no network)")
    i.add_argument("--wheels", type=Path, default=Path(".whl"))
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--all", action="store_true", help="every wheel, also those this Python already has")
    args = parser.parse_args(argv)
    if args.command == "build":
        _print_manifest(build(args.out, args.python_version))
        print(f"wrote {args.out / MANIFEST}")
        return 0
    try:
        result = install(args.wheels, args.target, args.all)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        print(f"gpu_bundle install: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
