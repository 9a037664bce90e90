"""The shell helpers for GPU sessions (scripts/gpu_job.sh): background jobs that outlive one device call."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_job.sh"


def job(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_HOME": str(home), "POLL": "0.2"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_job_runs_in_the_background_and_its_exit_code_is_reported(tmp_path):
    started = job(tmp_path, "start", "demo", "bash", "-c", "echo first line; sleep 1; echo last line; exit 3")
    assert started.returncode == 0, started.stderr
    again = job(tmp_path, "start", "demo", "true")
    assert again.returncode == 2 and "already running" in again.stderr
    waited = job(tmp_path, "wait", "demo", "30")
    assert waited.returncode == 0
    assert "last line" in waited.stdout and "exit code 3" in waited.stdout
    assert job(tmp_path, "status").stdout.strip() == "demo: ended, exit code 3"


def test_wait_reports_a_job_still_running(tmp_path):
    assert job(tmp_path, "start", "slow", "sleep", "30").returncode == 0
    try:
        waited = job(tmp_path, "wait", "slow", "1")
        assert waited.returncode == 1 and "still running" in waited.stdout
        assert job(tmp_path, "status").stdout.strip() == "slow: running"
    finally:
        os.killpg(int((tmp_path / "jobs" / "slow" / "pid").read_text()), 9)  # (setsid: the job leads its group)


@pytest.mark.parametrize("args, message", [(("wait", "nothing"), "no job nothing"), (("start", "x"), "needs a command"),
                                           (("launch",), "usage")])
def test_bad_use_is_refused_in_one_line(tmp_path, args, message):
    result = job(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
