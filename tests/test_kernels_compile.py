"""The Triton kernel compiles ahead of time for sm_90 and sm_80 (no GPU needed), without register spills
at the default block sizes.

Compilation runs in a subprocess with TRITON_INTERPRET unset (the interpreter replaces the compiler in the
process where it was set). Registers and local memory (spills) are read from the cubin with the cuobjdump
that ships with triton; `triton.compile` only fills n_regs / n_spills when it loads the kernel on a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # for consistency with test_kernels; the compile runs apart

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

_COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from babydistill.kernels import triton_kernel as tk

cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
results = []
for arch in (90, 80):
    for dtype in ("fp32", "bf16", "fp16"):
        for uniform, control in ((False, False), (True, False), (False, True)):
            signature = {
                "logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "labels_ptr": "*i64", "ids_ptr": "*i64",
                "logp_ptr": "*fp32", "stash_ptr": "*fp32", "control_ptr": "*fp32", "r_ptr": "*fp32",
                "ntail_ptr": "*fp32",
                "wce_ptr": "*fp32", "wkl_ptr": "*fp32", "ce_ptr": "*fp32", "kl_ptr": "*fp32",
                "V": "i32", "K": "i32", "stride_l": "i64", "stride_g": "i64", "inv_T": "fp32",
                "ignore_index": "i64", "exact_tail_below": "fp32", "UNIFORM": "constexpr",
                "BUCKET": "constexpr", "HAS_CONTROL": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "BLOCK_F": "constexpr"}
            constexprs = {"UNIFORM": uniform, "BUCKET": not uniform, "HAS_CONTROL": control, "BLOCK_V": tk.BLOCK_V,
                          "BLOCK_K": tk.BLOCK_K, "BLOCK_F": tk.BLOCK_F}
            src = ASTSource(fn=tk.sparse_distill_kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": tk.NUM_WARPS})
            row = {"kernel": "sparse_distill_kernel", "arch": f"sm_{arch}", "dtype": dtype,
                   "tail": "uniform" if uniform else "bucket/renorm", "control": control, "BLOCK_V": tk.BLOCK_V,
                   "num_warps": tk.NUM_WARPS, "ptx_lines": compiled.asm["ptx"].count("\n")}
            if cuobjdump.exists():
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"]); f.flush()
                    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                           capture_output=True, text=True, check=True).stdout
                row["n_regs"] = int(re.search(r"REG:(\d+)", usage).group(1))
                row["n_spills"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))  # bytes of local memory
            results.append(row)
print("RESULTS " + json.dumps(results))
"""


def test_triton_kernel_compiles_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    print("\nTriton AOT compile (registers per thread, local-memory spill bytes):")
    for row in results:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    assert {r["arch"] for r in results} == {"sm_90", "sm_80"}
    for row in results:
        if "n_spills" in row:
            assert row["n_spills"] == 0, f"register spills at the default block sizes: {row}"
            assert row["n_regs"] <= 255, row
