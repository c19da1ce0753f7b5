"""The Triton kernels compile for the GPUs they target, and their hot loops stay short.

``python -m fastrl_kernels.triton.inspect`` compiles the kernels ahead of time for sm_90a (H100 /
H200) and sm_80 (A100) on this CPU machine and reads registers, spills and the SASS of the loop that
streams the vocabulary. A kernel that a GPU could not compile, that spills, or whose hot loop grows
past its budget fails here, on the CPU. The budgets (SASS instructions per logit element, bf16,
V = 151936, sm_90a) are what keeps the kernels bound by memory rather than by instruction issue on an
H100 (docs/gpu.md): stats <= 12, grad <= 16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")
pytestmark = pytest.mark.triton

BUDGET = {"stats": 12.0, "grad": 16.0}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastrl_kernels.triton.inspect", "--arch", "sm_90a", "--arch", "sm_80",
               "--vocab", "151936", "--vocab", "50257", "--dtype", "bf16", "--dtype", "fp32", "--json", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(path.read_text())["reports"]


def test_every_variant_compiles_for_both_architectures_without_spills(reports):
    # 2 vocabularies x 2 dtypes x (4 stats variants: softcap x log_sum_p2, 2 grad: softcap) x 2 architectures.
    assert len(reports) == 48
    assert {r["arch"] for r in reports} == {"sm_90a", "sm_80"}
    for r in reports:
        name = f"{r['variant']['kernel']} {r['variant']['dtype']} V={r['variant']['vocab']} {r['arch']}"
        assert r["spill_bytes"] == 0, name
        assert r["loop_instructions"] > 0, f"{name}: no vocabulary loop found in the SASS"
        assert r["registers"] <= 255, name


@pytest.mark.parametrize("kernel", ["stats", "grad"])
def test_hot_loop_fits_its_instruction_budget(reports, kernel):
    (report,) = [r for r in reports if r["arch"] == "sm_90a" and r["variant"]["kernel"] == kernel
                 and r["variant"]["dtype"] == "bf16" and r["variant"]["vocab"] == 151936
                 and not r["variant"]["has_softcap"] and not r["variant"]["with_log_sum_p2"]]
    assert report["instructions_per_element"] <= BUDGET[kernel], report["loop_opcodes"]


@pytest.mark.parametrize("vocab", [151936, 50257])
def test_hot_loop_uses_128_bit_accesses_whatever_the_vocabulary(reports, vocab):
    """V = 50257 rows start at any element: the aligned head keeps the full blocks on 16-byte
    boundaries, so each thread moves its elements in 16-byte loads (and stores)."""
    for r in reports:
        v = r["variant"]
        if v["vocab"] != vocab or v["has_softcap"]:
            continue
        accesses = r["elements_per_thread"] * ELEMENT_BYTES[v["dtype"]] / 16
        assert r["loop_opcodes"].get("LDG") == accesses, (v, r["arch"], r["loop_opcodes"])
        if v["kernel"] == "grad":
            assert r["loop_opcodes"].get("STG") == accesses, (v, r["arch"], r["loop_opcodes"])


def test_hot_loop_finder_reads_nvdisasm_listings():
    from fastrl_kernels.triton.inspect import hot_loop

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R5, R4, -R6 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   MUFU.EX2 R7, R5 ;
.L_x_1:
        /*0050*/               @!P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""
    assert hot_loop(listing) == ["LDG.E.128", "FADD", "BRA", "MUFU.EX2", "BRA"]
