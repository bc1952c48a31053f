"""The benchmark suite's smoke run (tiny U-Nets, tiny frames): it must run end to end and write
its table, plots and JSON, with the engine and the baseline agreeing. No assertion on times."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.train
def test_bench_smoke_runs_and_writes_results(tmp_path):
    from benchmarks.suite import BF16_ATOL, PARITY_ATOL, main

    res = main(["--smoke", "--out", str(tmp_path)])
    for name in ("results.md", "results.json", "latency_vs_members.png", "latency_vs_size.png"):
        assert (tmp_path / name).is_file(), name
    assert set(json.loads((tmp_path / "results.json").read_text())) >= {"members", "service"}
    assert all(max(r["parity"].values()) <= PARITY_ATOL for r in res["members"].values())
    for svc in res["service"].values():                       # lossless: every frame came back
        got, sent = svc["flood_received"].split("/")
        assert got == sent
    precs = res["precisions"]
    assert set(res["service"]) == set(precs) and set(res["accuracy"]) >= set(precs)
    if "bf16" in precs:
        assert all(max(r["vs_fp32"]["bf16"].values()) <= BF16_ATOL
                   for r in res["members"].values())
    assert "ratio baseline/engine fp32" in (tmp_path / "results.md").read_text()
