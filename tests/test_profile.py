"""profile.py: the resource table runs at a tiny size and prints every requested model with figures that
agree with independent counts, dense CTAL's elementwise fusion included; the file does not break the
standard library's cProfile that its name shadows."""
import os
import re
import subprocess
import sys

import pytest

import profile
from ctal import CTAL
from data import DATASETS
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_table_prints_every_requested_model(capsys):
    models = ["mtl", "papnet x2", "ctal_ss"]
    rows = profile.main(["--img-size", "64x96", "--batch", "1", "--iters", "1", "--val-images", "4",
                         "--models", *models])
    printed = capsys.readouterr().out
    for name in models:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name
    assert list(rows) == models
    # each row as soon as it is measured (announced before, on the line it then overwrites), with the time so far
    lines = printed.splitlines()
    rows_at = [next(i for i, line in enumerate(lines) if line.startswith(m + " ")) for m in models]
    assert [lines.index(f"  measuring {m} ...") for m in models] == [i - 1 - (i == rows_at[0]) for i in rows_at]
    so_far = [float(re.search(r' (\d+)s   ', line)[1]) for line in lines if line.split(' ')[0] in ('mtl', 'papnet', 'ctal_ss')]
    assert len(so_far) == 3 and so_far == sorted(so_far)
    stl = build_model("stl", DATASETS["nyuv2"]["tasks"], (64, 96))
    mtl = build_model("mtl", DATASETS["nyuv2"]["tasks"], (64, 96))
    n_stl, n_mtl = (sum(p.numel() for p in m.parameters()) for m in (stl, mtl))
    assert rows["mtl"]["params"] == n_mtl
    assert rows["mtl"]["rel_params"] == pytest.approx(n_mtl / n_stl)
    for r in rows.values():  # the papers' convention: multiply-accumulates of a batch of 8
        assert r["gmac_batch8"] == pytest.approx(r["flops_per_image"] * 4 / 1e9)
        assert r["val_seconds"] == pytest.approx(r["seconds_per_batch"] * 4)
    # two PAP iterations add one more propagation: more FLOPs, the same parameters
    pap1 = profile.model_stats("papnet", "nyuv2", [64, 96], 0.25, "auto", 1, 1, "cpu", 1, False)
    assert rows["papnet x2"]["params"] == pap1["params"]
    assert rows["papnet x2"]["flops_per_image"] > pap1["flops_per_image"]


def test_model_table_counts_dense_ctal_as_the_papers_do():
    """The papers count dense CTAL: A_t and V G^T (2 T C HW^2 each) and the grouped conv (T k^2 HW^2), all
    multiply-adds; here the fusion is elementwise, so the table adds it to FlopCounterMode's count."""
    size, hw = (64, 96), 16 * 24                        # CTAL at 1/4 of the input
    dense, linear = (profile.model_stats("ctal_ss", "nyuv2", list(size), 0.25, impl, 1, 1, "cpu", 1, False)
                     for impl in ("dense", "linear"))
    model = build_model("ctal_ss", DATASETS["nyuv2"]["tasks"], size, ctal_impl="linear")
    ctal = next(m for m in model.modules() if isinstance(m, CTAL))
    T, C = ctal.num_tasks, ctal.channels
    linear_core = 2 * T * T * 9 * C * C * (18 * 26 + hw)    # K_d over the padded 18 x 26 grid, K_d Z_d over HW
    dense_core = 2 * hw * hw * (2 * T * C + T * 9)
    assert dense["flops_per_image"] - linear["flops_per_image"] == pytest.approx(dense_core - linear_core, rel=1e-9)


def test_ctal_benchmark_runs_and_reports_ratios(capsys):
    result = profile.main(["--module", "ctal", "--scale", "1/32", "--channels", "8", "--iters", "1"])
    printed = capsys.readouterr().out
    assert "dense / linear: time" in printed and "map 9x12" in printed
    dense, linear = result["rows"]["dense"], result["rows"]["linear"]
    T, C, hw, B = 3, 8, 9 * 12, 2
    # forward+backward FLOPs by hand: each product and conv forward, and twice it backward (both operands).
    # Common: the projections, T 3x3 convs C -> C. Dense, the literal algorithm: A = f^T f and V G^T (2 T C HW^2
    # each) and the grouped conv (2 T k^2 HW^2). Linear, per kernel offset: K_d = V S_d^T over the L = 11 x 14
    # positions of the zero-padded grid and K_d Z_d over the HW positions.
    proj = 3 * T * 2 * B * C * C * 9 * hw
    dense_core = 3 * B * (2 * 2 * T * C + 2 * T * 9) * hw * hw
    assert dense["flops"] - proj == pytest.approx(dense_core, rel=1e-6)
    L = 11 * 14
    assert linear["flops"] - proj == pytest.approx(3 * B * 2 * T * C * T * C * 9 * (L + hw), rel=0.01)
    # the linear form's rate counts its unfold form's work: (TC) x (TC k^2) x HW, two GEMMs, times 3
    assert linear["work_flops"] == B * 3 * 2 * 2 * (T * C) ** 2 * 9 * hw + proj
    assert linear["gflops_per_s"] == pytest.approx(linear["work_flops"] / linear["seconds"] / 1e9)
    assert dense["gflops_per_s"] == pytest.approx(dense["flops"] / dense["seconds"] / 1e9)
    for row in (dense, linear):      # beside the GEMM rate measured in the same process
        assert row["gemm_gflops"] > 0
        assert row["fraction_of_gemm"] == pytest.approx(row["gflops_per_s"] / row["gemm_gflops"])
    assert "% GEMM" in printed and "cost per FLOP" in printed
    assert result["auto"] == profile.choose_impl(T, C, (9, 12), device="cpu")
    assert result["flop_ratio"] == pytest.approx(hw * hw * (2 * T * C + T * 9) / (T * T * 9 * C * C * (L + hw)))


def test_auto_matches_the_cheaper_flop_count():
    # at 1/4 the linear form must need about half the dense FLOPs (the "about 2x")
    size, C, T = (72, 96), 128, 3
    hw = size[0] * size[1]
    dense = hw * hw * (4 * T * C + 2 * T * 9)
    linear = 4 * T * T * 9 * C * C * hw
    assert 1.8 < dense / linear < 2.3
    assert CTAL(T, C, size).impl_for("cuda") == CTAL(T, C, size).impl_for("cpu") == "linear"


def test_cprofile_still_works_beside_profile_py():
    assert profile.run.__module__ == profile.Profile.__module__ == "_stdlib_profile"
    code = "import cProfile, pstats, io; p = cProfile.Profile(); p.runcall(sum, range(10)); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--models", "transformer"])
    assert "unknown model 'transformer'; valid: stl, mtl" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    (["--module", "ctal", "--iters", "-1"], "argument --iters: expected a positive integer"),
    (["--img-size", "abc"], "expected a size HxW, e.g. 96x128"),
    (["--dataset", "pascal", "--models", "mtl", "--img-size", "100x100", "--iters", "1"],
     "positive multiples of 32"),
    (["--models", "mtl", "--img-size", "7x9", "--iters", "1"], "ints >= 32, got (7, 9)"),   # refused in the subprocess
    (["--json", "/nonexistent-folder/x.json"], "cannot write there"),
    (["--scale", "1/2"], "at most at 1/4"),
])
def test_bad_arguments_stop_with_a_message_before_measuring(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="the kernel does not let this process reset its peak resident set")
def test_cpu_peak_memory_is_the_steps_own_after_a_larger_earlier_peak():
    """A step that touches 100 MB reads as about 100 MB even though 400 MB were resident just before: the
    peak is reset before the measurement (otherwise a model whose construction peaks higher than its
    forward, like Swin-V2-S, read as 0 MB)."""
    code = ("import numpy as np, profile\n"
            "big = np.ones(50_000_000); del big\n"                        # 400 MB, freed
            "seconds, peak = profile.measure(lambda: np.ones(12_500_000).sum(), 'cpu', iters=1)\n"
            "print(peak / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert 80 < float(out.stdout.strip().splitlines()[-1]) < 200
