"""The wheel bundle for a GPU node without network (``make gpu-bundle`` / the GPU check's install part).

The unit tests use small hand-made wheels. The end-to-end test builds a bundle from PyPI for *this* Python
(the GPU node's 3.12 wheels cannot import here), installs it with ``--no-index`` into an empty target from a
fresh venv that has torch and nothing else, and imports DeepSpeed, webdataset, submitit and OmegaConf there.
"""

import contextlib
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from ltdist.kernels import gpu_bundle

ROOT = Path(__file__).resolve().parents[1]
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def _wheel(directory: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = directory / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
               *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", "\n".join(headers) + "\n\nlong description: Name: not-a-header\n")
        z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{info}/RECORD", "")
        z.writestr(f"{name.replace('-', '_')}_mod.py", "VALUE = 1\n")
    return path


def test_manifest_records_every_wheel_and_install_rejects_a_changed_one(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", ["beta>=2", "gamma; python_version < '3'", "delta; extra == 'x'"])
    beta = _wheel(tmp_path, "beta", "2.1", [])
    manifest = gpu_bundle.write_manifest(tmp_path, HERE, {"torch"})
    assert [(w["name"], w["version"]) for w in manifest["wheels"]] == [("alpha", "1.0"), ("beta", "2.1")]
    assert manifest["wheels"][0]["requires"][0] == "beta>=2"
    assert manifest["total_bytes"] == sum(w["size"] for w in manifest["wheels"]) > 0
    assert gpu_bundle.read_manifest(tmp_path) == json.loads((tmp_path / "manifest.json").read_text())

    result = gpu_bundle.install(tmp_path, tmp_path / "site")
    assert result["installed"] == ["alpha==1.0", "beta==2.1"] and result["same_python"]
    assert (tmp_path / "site" / "alpha_mod.py").is_file() and (tmp_path / "site" / "beta_mod.py").is_file()

    beta.write_bytes(beta.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"beta-2\.1-py3-none-any\.whl: missing or not the wheel"):
        gpu_bundle.read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="make gpu-bundle"):
        gpu_bundle.install(tmp_path, tmp_path / "site")


def test_only_what_this_python_lacks_or_has_too_old_is_installed(tmp_path):
    have = metadata.version("pytest")
    _wheel(tmp_path, "pytest", have, [])
    _wheel(tmp_path, "packaging", "99.0", [])
    _wheel(tmp_path, "not-installed-anywhere", "1.0", [])
    _wheel(tmp_path, "user", "1.0", ["packaging>=99", f"pytest=={have}", "not-installed-anywhere"])
    manifest = gpu_bundle.write_manifest(tmp_path, HERE, set())
    names = [w["name"] for w in gpu_bundle.needed(manifest)]
    # pytest: present at an accepted version; packaging: present but older than 99; the others: absent
    assert names == ["not-installed-anywhere", "packaging", "user"]
    alone = [w for w in manifest["wheels"] if w["name"] == "pytest"]
    assert gpu_bundle.needed({**manifest, "wheels": alone}) == []


def test_a_deepspeed_wheel_with_compiled_ops_is_refused(tmp_path):
    _wheel(tmp_path, "deepspeed", "0.18.0", [], tag="cp312-cp312-linux_x86_64")
    with pytest.raises(RuntimeError, match="not py3-none-any"):
        gpu_bundle.write_manifest(tmp_path, "3.12", set())


def test_a_bundle_for_another_python_is_unpacked_for_that_python(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", [], tag="cp312-cp312-manylinux_2_17_x86_64")
    gpu_bundle.write_manifest(tmp_path, "3.12", set())
    result = gpu_bundle.install(tmp_path, tmp_path / "site")
    assert not result["same_python"] and result["installed"] == ["alpha==1.0"]
    assert (tmp_path / "site" / "alpha_mod.py").is_file()


def _closure(name: str) -> set[str]:
    """``name`` and what it requires, transitively, as installed here."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = gpu_bundle.canonical(todo.pop())
        if current not in seen:
            seen.add(current)
            with contextlib.suppress(metadata.PackageNotFoundError):
                todo += [r.name for r in gpu_bundle._requirements(metadata.requires(current) or [], HERE)]
    return seen


def _torch_only_venv(path: Path) -> Path:
    """A fresh venv (with pip) that sees this environment's torch and what torch requires, nothing else."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300,
                   env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    python = path / "bin" / "python"
    linked = path / "torch-only"
    linked.mkdir()
    site_packages = Path(metadata.distribution("torch").locate_file(""))
    for name in sorted(_closure("torch")):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "bin"}:
            if (site_packages / top).exists() and not (linked / top).exists():
                (linked / top).symlink_to(site_packages / top)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "torch-only.pth").write_text(f"{linked}\n")
    return python


@pytest.mark.slow
@pytest.mark.network
def test_bundle_installs_with_no_index_and_imports_in_a_venv_with_only_torch(tmp_path):
    wheels = tmp_path / "whl"
    try:
        manifest = gpu_bundle.build(wheels, HERE)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"PyPI not reachable for the bundle build: {e}")
    names = {w["name"] for w in manifest["wheels"]}
    assert set(gpu_bundle.IMPORTS) | {"pydantic", "numpy", "pytest"} <= names
    assert not names & {"torch", "triton", "sympy"}  # the node's own (sympy: torch's, needed by nothing else)
    assert any(w["file"].endswith("-py3-none-any.whl") for w in manifest["wheels"] if w["name"] == "deepspeed")

    python = _torch_only_venv(tmp_path / "venv")
    bare = subprocess.run([str(python), "-c", "import torch, importlib.util as u; print(u.find_spec('numpy'))"],
                          capture_output=True, text=True)
    assert bare.returncode == 0 and bare.stdout.strip() == "None", bare.stderr  # torch, and no numpy
    target = tmp_path / "site"
    proc = subprocess.run([str(python), str(ROOT / "kernels" / "gpu_bundle.py"), "install", "--wheels", str(wheels),
                           "--target", str(target)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    # the venv had none of them but what torch brought at an accepted version
    assert {i.split("==")[0] for i in result["installed"]} == names - set(result["already_present"])
    assert set(result["already_present"]) <= _closure("torch")
    imported = gpu_bundle.check_imports(target, python=str(python))
    assert set(imported) == set(gpu_bundle.IMPORTS)
    assert all(Path(m["file"]).is_relative_to(target) for m in imported.values())
