"""quant/'s Triton kernels (dequant, per-token activation quant, SwiGLU product quant) checked on the CPU by Triton's interpreter.

The check runs in a subprocess because Triton decides at import whether kernels are interpreted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).parent / "triton_interpret" / "check_kernels.py"


def test_triton_kernels_match_pytorch_references_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    findings = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(findings) == 2 * 2 * 2 * 3 + 2 + 2 and all(all(v.values()) for v in findings.values()), findings
