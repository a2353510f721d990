"""The AOT compile check (no GPU): kernel discovery, signatures, the restore_value rule, a real sm_80/sm_90
compile of one kernel, and the shared-memory pruner. Runs in subprocesses: the other kernel tests switch
this process to TRITON_INTERPRET, under which kernels are interpreted, not compiled."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PROBE = r"""
import json
import torch
from ltdist.kernels import _triton_matmul as tm, compile_check as cc
from ltdist.kernels.prototype_ema_triton import _ema_kernel
found = [name for _, name, _ in cc.discover()]
rw = {name: sorted(cc.read_and_written(cc._jit(k))) for _, name, k in cc.discover()}
sig = {d: cc.signature(_ema_kernel, d)[0] for d in ("fp32", "bf16")}
pruner = tm._scaled_gmm_kernel.early_config_prune
cands = {d: [str(c) for c in pruner.candidates(tm._scaled_gmm_kernel.configs, getattr(torch, d))]
         for d in ("float32", "bfloat16")}
pools = {"float32": [str(c) for c in pruner.fp32], "bfloat16": [str(c) for c in pruner.tc]}
shared = lambda c: 200_000 if c.kwargs["BM"] == 128 else 1_000  # pretend: the 128-row tiles need 200 KB
fits = [str(c) for c in pruner.fitting(pruner.tc, shared, 166_912)]
try:
    pruner.fitting(pruner.tc, lambda c: 300_000, 166_912)
    none_fits = ""
except RuntimeError as exc:
    none_fits = str(exc)
ok = cc.failures([], cc.discover())
tm._scaled_gmm_kernel.restore_value = []
broken = cc.failures([], cc.discover())
print(json.dumps(dict(found=found, rw=rw, sig=sig, ok=ok, broken=broken, cands=cands, pools=pools, fits=fits,
                      tc=[str(c) for c in pruner.tc], none_fits=none_fits)))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_discovery_signatures_and_the_restore_rule():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.splitlines()[-1])
    assert set(res["found"]) == {"_cosine_matmul_kernel", "_scaled_gmm_kernel", "_ce_grad_kernel", "_ema_kernel"}
    assert res["rw"]["_scaled_gmm_kernel"] == ["out_ptr"]  # through o_ptrs = out_ptr + …
    assert res["rw"]["_ema_kernel"] == ["out_ptr"] and res["rw"]["_cosine_matmul_kernel"] == []
    assert res["sig"]["fp32"]["feats_ptr"] == "*fp32" and res["sig"]["bf16"]["feats_ptr"] == "*bf16"
    assert res["sig"]["bf16"]["out_ptr"] == "*fp32" and res["sig"]["bf16"]["classes_ptr"] == "*i64"
    assert res["sig"]["bf16"]["m"] == "fp32" and res["sig"]["bf16"]["F"] == "i32"
    assert res["cands"] == res["pools"]  # fp32 inputs get the FMA tiles, bf16 the tensor-core tiles
    assert res["fits"] == [c for c in res["tc"] if "BM: 128" not in c] and res["fits"]
    assert "_scaled_gmm_kernel: none of the configs" in res["none_fits"] and "166912 bytes" in res["none_fits"]
    assert res["ok"] == []
    assert len(res["broken"]) == 1 and "_scaled_gmm_kernel" in res["broken"][0] and "out_ptr" in res["broken"][0]


def test_compiles_a_kernel_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, "-m", "ltdist.kernels.compile_check", "--quick", "--jobs", "1",
                           "--kernel", "_ema_kernel", "--out", str(out)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert {(r["dtype"], r["target"]) for r in rows} == {(d, t) for d in ("fp32", "bf16") for t in ("sm_80", "sm_90")}
    assert all(r["ok"] and r["registers"] > 0 and 0 <= r["shared"] <= r["limit"] and r["pickable"] for r in rows)
    assert table["summary"]["compile_failures"] == 0 and table["failures"] == []


def test_refuses_under_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "ltdist.kernels.compile_check"], capture_output=True, text=True,
                          env={**_env(), "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_each_requirement_is_a_failure_line():
    from ltdist.kernels.compile_check import Row, failures

    def row(**kw):
        base = dict(module="m", kernel="k", config="BM=64", dtype="bf16", target="sm_80", flags="", candidate=True,
                    ok=True, shared=1000, limit=166_912, fits=True, pickable=True, uses_dot=True, tensor_core_ops=8)
        return Row(**{**base, **kw})

    assert failures([row(), row(dtype="fp32", uses_dot=True, tensor_core_ops=0)], []) == []
    broken = failures([row(ok=False, error="CompilationError: x", pickable=False)], [])
    assert len(broken) == 1 and "does not compile: CompilationError" in broken[0]
    too_big = failures([row(shared=200_000, fits=False, pickable=False), row(candidate=False, pickable=False)], [])
    assert len(too_big) == 1 and "no config left for autotuning" in too_big[0] and "[200000] > 166912" in too_big[0]
    no_mma = failures([row(tensor_core_ops=0)], [])
    assert len(no_mma) == 1 and "no tensor-core instruction" in no_mma[0]
