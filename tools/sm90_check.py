"""Compile every Triton kernel, in every launch configuration it is used with, for sm_90 (H100 /
H200) without a GPU, and check that registers do not spill.

    python -m tools.sm90_check [--json]

Each kernel module lists its configurations in ``SM90_CONFIGS``. For each one: triton.compile
with target GPUTarget("cuda", 90, 32); the cubin goes through the cuobjdump shipped in the triton
wheel (--dump-resource-usage: registers, stack, local memory) and its SASS is scanned for local
loads/stores (LDL/STL = spills). Exit code 1 if any configuration fails to compile or spills.
Each configuration is compiled twice: as declared, and with the specialisation Triton's JIT adds
at launch when the values allow it (``tt.divisibility = 16`` on every pointer and integer argument:
16-byte-aligned tensors, strides and V multiples of 16, the usual case), since that variant is the
one launched on aligned inputs and it compiles differently (vectorised loads).
Must run without TRITON_INTERPRET (the interpreter replaces the JIT functions).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

KERNEL_MODULES = ["metapo_fast.kernels.lce_epilogue", "metapo_fast.kernels.tracker"]


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return path


def jit_divisibility_attrs(signature: dict) -> dict:
    """The attributes the JIT specialises aligned launches with: divisibility by 16 of every
    pointer and integer argument (by position)."""
    return {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values())
            if ty.startswith("*") or ty in ("i32", "i64")}


def check_config(cfg: dict, aligned: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = jit_divisibility_attrs(cfg["signature"]) if aligned else None
    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)

    def field(name):
        m = re.search(rf"{name}:(\d+)", usage)
        return int(m.group(1)) if m else None

    spill_instr = len(re.findall(r"\b(LDL|STL)\b", sass))
    res = {"name": cfg["name"] + ("_aligned16" if aligned else ""), "registers": field("REG"), "stack": field("STACK"), "local": field("LOCAL"),
           "shared": field("SHARED"), "spill_instructions": spill_instr, "num_warps": cfg["num_warps"]}
    res["ok"] = res["registers"] is not None and not res["local"] and not spill_instr
    return res


def check_all() -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tools.sm90_check must run without TRITON_INTERPRET=1 (the interpreter replaces triton.jit)")
    out = []
    for mod in KERNEL_MODULES:
        for cfg in importlib.import_module(mod).SM90_CONFIGS:
            for aligned in (False, True):
                try:
                    out.append({"module": mod, "aligned": aligned, **check_config(cfg, aligned)})
                except Exception as exc:  # reported per configuration: a compile error fails the check below
                    out.append({"module": mod, "aligned": aligned, "name": cfg["name"], "ok": False,
                                "error": f"{type(exc).__name__}: {exc}"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = check_all()
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']}: " +
                  (r.get("error") or f"{r['registers']} registers, stack {r['stack']}, local {r['local']}, "
                                     f"{r['spill_instructions']} LDL/STL, {r['num_warps']} warps"))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
