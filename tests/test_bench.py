"""Smoke tests of the benchmark scripts (the benchmarks themselves are run by hand, see bench/README.md)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = ("supernet.py", "shrink.py", "inference.py")


def run(script, *args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--json" in proc.stdout


def test_supernet_json_has_every_headline_figure():
    proc = run("supernet.py", "--filters", "8", "--stages", "1", "--levels", "2", "--batch", "2", "--steps",
               "1", "--naive-steps", "1", "--warmup", "0", "--peak-n", "256", "--memory-steps", "2",
               "--variants", "fast,fast_recompute,naive,naive_plain,naive_trained_only", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("speedup_vs_naive", "memory_ratio_vs_naive", "speedup_vs_naive_plain",
                "memory_ratio_vs_naive_plain", "speedup_vs_naive_trained_only", "peak_fraction",
                "peak_gflops", "step_gflop",
                "fast_recompute_speedup_vs_naive", "fast_recompute_memory_ratio_vs_naive",
                "fast_recompute_peak_fraction"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["variants"]) == {"fast", "fast_recompute", "naive", "naive_plain", "naive_trained_only"}
    # the published solver's steps compute every gradient; dsonas's only the stepped group's
    every = {v for v, figures in result["variants"].items() if figures["every_gradient_every_step"]}
    assert every == {"naive", "naive_plain"}
    for figures in result["variants"].values():
        for key in ("ms_per_w_step", "ms_per_lambda_step", "images_per_s", "peak_rss_delta_mb"):
            assert figures[key] > 0, key
    assert result["step_gflop"] == pytest.approx(6 * result["forward_macs"] / 1e9)
    assert result["config"]["memory_steps"] == 2
    machine = result["config"]["load_at_start"]
    assert machine["cpu_model"] and isinstance(machine["isa"], list)


def test_bad_genotype_is_one_line_error(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("{}")
    proc = run("inference.py", "--genotype", str(bad), "--sizes", "32", "--models", "")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_inference_json_compares_every_form_and_checks_their_outputs():
    proc = run("inference.py", "--sizes", "32", "--models", "shufflenet_v2", "--width-mult", "0.25",
               "--repeats", "1", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"dsonas", "shufflenet_v2"}
    for row in rows.values():
        assert row["outputs_match"], row
        for form in ("static", "folded", "mkldnn"):  # a figure, or the form is listed as failed there
            for batch, key in ((1, "b1_ms"), (8, "b8_ms"), (64, "b64_images_per_s")):
                assert row.get(f"{form}_{key}", 0) > 0 or f"{form} b{batch}" in row.get("failed", []), row
        assert row["static_b1_ms"] > 0
        forms_b1 = [row[k] for k in ("static_b1_ms", "folded_b1_ms", "mkldnn_b1_ms") if k in row]
        assert row["b1_ms"] == min(forms_b1)
    ratios = result["vs_shufflenet_v2"]["32"]
    assert set(ratios) == {"macs_ratio", "b1_latency_ratio", "b8_latency_ratio", "b64_throughput_ratio"}


def test_cpu_identity_reads_the_model_and_the_kernel_deciding_flags(tmp_path):
    spec = importlib.util.spec_from_file_location("dsonas_bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)  # by path: tools/ has a `common` module too
    spec.loader.exec_module(common)
    cpu_identity, load_note = common.cpu_identity, common.load_note
    info = tmp_path / "cpuinfo"
    cpu = "model name\t: Some CPU 9000\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"
    info.write_text(f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}")
    identity = cpu_identity(info)
    assert identity == {"cpu_model": "Some CPU 9000", "isa": ["avx512f", "avx2"]}
    assert load_note({"cpus": 2, "load_1m": 0.1, **identity}).startswith("Some CPU 9000 (avx512f, avx2); ")
    assert cpu_identity(tmp_path / "missing") == {"cpu_model": "unknown", "isa": []}
