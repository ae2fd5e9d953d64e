"""The benchmark's statistics against hand-computed values."""

import math

import pytest

from clic_lab.stats import paired_comparison, sign_test_p, wilson_interval


def test_sign_test_by_hand():
    # 8 wins, 2 losses: P(X <= 2) for Bin(10, 1/2) = (1 + 10 + 45) / 1024; two-sided doubles it
    assert sign_test_p(8, 2) == pytest.approx(2 * 56 / 1024)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)


def test_wilson_by_hand():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half z*sqrt(0.016 + z^2/400) / (1 + z^2/10)
    z = 1.959964
    den = 1 + z * z / 10
    centre, half = (0.8 + z * z / 20) / den, z * math.sqrt(0.016 + z * z / 400) / den
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_paired_comparison():
    a = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, None, 1]
    b = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, None]
    r = paired_comparison(a, b, n_boot=2000)
    assert r["n"] == 11 and (r["wins"], r["losses"], r["ties"]) == (9, 1, 1)
    assert r["diff"] == pytest.approx(8 / 11) and r["mean_a"] == pytest.approx(10 / 11)
    assert r["sign_p"] == pytest.approx(2 * 11 / 1024)          # P(X <= 1), Bin(10, 1/2), doubled
    assert 0 < r["ci"][0] < 8 / 11 < r["ci"][1] <= 1 and r["ahead"] is True
    assert paired_comparison(b[:11], a[:11], n_boot=2000)["ahead"] is False
    # 7 wins, 1 loss: the interval is above 0 but the sign test (p = 0.07) does not separate them
    assert paired_comparison([1] * 7 + [0, 1], [0] * 7 + [1, 1])["ahead"] is None
    assert paired_comparison([1, 0] * 5, [0, 1] * 5)["ahead"] is None       # as many wins as losses
    assert paired_comparison([], [])["n"] == 0


def test_paired_report_reads_the_benchmark_outputs(tmp_path):
    """CLiC against each baseline from results.csv (seeds averaged per case) and extras.json's generation rows;
    'lower is better' columns count a lower score as ahead."""
    import json

    from clic_lab.toyworld.benchmark import paired_report

    lines = ["case,method,base,seed,presence,leakage,colour"]
    for i in range(12):
        lines.append(f"c{i},clic,clic,0,1,0,1")
        lines.append(f"c{i},clic,clic,1,{1 if i else 0},0,1")          # case 0: CLiC's two seeds average 0.5
        lines.append(f"c{i},custom-diffusion,custom-diffusion,0,0,1,")   # colour missing: the column has no pairs
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    gen = [{"case": f"c{i}", "method": m, "on_part": v, "off_part": 0.0}
           for i in range(12) for m, v in (("clic", 0.0), ("break-a-scene", 1.0))]
    (tmp_path / "extras.json").write_text(json.dumps({"rows": {"generation": gen}}))
    rep = paired_report(tmp_path, n_boot=500)
    by = {(c["table"], c["column"], c["other"]): c for c in rep["comparisons"]}
    pres = by[("transfer", "presence", "custom-diffusion")]
    assert pres["n"] == 12 and pres["diff"] == pytest.approx(11.5 / 12) and pres["ahead"] is True
    leak = by[("transfer", "leakage", "custom-diffusion")]
    assert leak["diff"] == pytest.approx(-1.0) and leak["ahead"] is True          # CLiC leaks less: ahead
    assert ("transfer", "colour", "custom-diffusion") not in by                   # no colour scores: no pairs
    on_part = by[("generation", "on_part", "break-a-scene")]
    assert on_part["ahead"] is False and on_part["losses"] == 12
    assert by[("generation", "off_part", "break-a-scene")]["ahead"] is None       # all ties
    md = (tmp_path / "paired.md").read_text()
    assert "**clic ahead**" in md and "break-a-scene ahead" in md and "not separated" in md
