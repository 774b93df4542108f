"""`slmfed simulate` end to end on the real path: synth DICOM -> prepare -> Flower simulation (Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _ray_pids() -> set[int]:
    """Running Ray processes. Zombies are not running: an exited worker waits in the process table
    until its parent (or PID 1, which in some containers never reaps) collects it, and pgrep -f
    still matches it by name."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    running = set()
    for pid in map(int, out.split()):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != "Z":
            running.add(pid)
    return running


@pytest.mark.slow
def test_simulate_paper_scenario_through_ray_leaves_nothing_running(tmp_path):
    from simulation.synth import generate_cohort

    data = tmp_path / "cohort"
    generate_cohort(data, preset="small", seed=0, progress=False)  # 28 + 12: folds that k = 3 can release
    before = _ray_pids()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--data", str(data), "--out", str(tmp_path / "run"),
         "--folds", "2", "--num-rounds", "1", "--local-epochs", "1", "--models", "cf,dl,combined", "--cf-l2", "0.5",
         "--min-cell-size", "3"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "center-primary: 2-fold CV" in proc.stdout and "center-external: external validation" in proc.stdout
    assert "report:" in proc.stdout
    report = (tmp_path / "run" / "report.md").read_text()
    # what a site needs to use the final models (slmfed predict), and the report as one web page
    bundle = json.loads((tmp_path / "run" / "models" / "final.json").read_text())
    assert set(bundle["models"]) == {"cf", "dl", "combined"} and bundle["preprocessing"]["channels"] == ["t2", "dwi", "adc"]
    assert "data:image/png;base64," in (tmp_path / "run" / "report.html").read_text()
    assert "| center-primary | 3 |" in report and "| center-external | 3 |" in report  # the k each site used
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {(r["model"], r["site"]) for r in res["rows"]} == {
        (m, s) for m in ("cf", "dl", "combined") for s in ("center-primary", "center-external")}
    assert res["oracle"]["center-primary"]["combined"] > 0.85  # truth.json travelled into the report
    assert (data / "caches" / "center-primary" / "manifest.json").is_file()
    assert not (_ray_pids() - before), "Ray processes left running after slmfed simulate"
