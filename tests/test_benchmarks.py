"""The GPU benchmark script cannot run in CI (no GPU); its tiny CPU configuration keeps it from rotting."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_benchmark_script_runs_on_a_tiny_cpu_config(tmp_path):
    out = tmp_path / "g.json"
    subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--config", "tiny", "--device", "cpu",
                    "--batch", "2", "--seq", "32", "--repeats", "1", "--out", str(out)],
                   cwd=Path(__file__).parents[1], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"bare_sdpa_body", "tl_run_with_cache", "castlens_extraction",
                                 "castlens_steered_scoring"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in res["paths"].values())


def test_patching_benchmark_checks_both_paths_agree_on_a_tiny_model(tmp_path):
    """The script refuses to time paths that disagree; on the tiny model they agree (fast reuse path against an
    eager full forward with a hook_z patch)."""
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, "benchmarks/patching_throughput.py", "--model", "tiny-llama", "--layer", "2",
                    "--layers", "2", "--n", "4", "--repeats", "1", "--out", str(out)],
                   cwd=Path(__file__).parents[1], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert res["heads"] == 8 and res["max_rel_diff"] < 1e-3 and res["speedup_median"] > 0
