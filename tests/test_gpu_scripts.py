"""The shell helpers for GPU sessions: background jobs that outlive one device call (scripts/gpu_job.sh), runs brought
back in parts (scripts/gpu_bring_back.sh), the judging and recipe scripts."""
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


JUDGE = SCRIPT.with_name("judge_runs.sh")


def test_judge_runs_evaluates_the_dev_winner_on_nq_dev_three_ways(tmp_path):
    import json

    for name, accuracy in (("s2-a", 8.0), ("s2-b", 12.0)):
        run = tmp_path / name
        (run / "checkpoints" / "step-0000300").mkdir(parents=True)
        (run / "latest").write_text("step-0000300")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 300, "accuracy@4x": accuracy, "gold_accuracy@4x": 30.0}))
    env = {**os.environ, "DRY": "1", "RATES": "4 8", "QA_ARGS": "--device cpu", "FIVE_ARGS": "--keep-top 5 --best-last"}
    judged = subprocess.run(["bash", str(JUDGE), str(tmp_path / "qa"), str(tmp_path / "s2-a"), str(tmp_path / "s2-b")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert judged.returncode == 0, judged.stderr
    commands = judged.stdout.strip().splitlines()
    winner = str(tmp_path / "s2-b" / "checkpoints" / "step-0000300")
    assert len(commands) == 3 and all(f"--gmsa-checkpoint {winner} " in c for c in commands)
    assert all("--data data/nq-multidoc/dev.jsonl.gz" in c and "--device cpu" in c for c in commands)
    assert commands[0].endswith("--rates 4 8 --name qa-judged --keep-top 5 --best-last")  # FIVE_ARGS: this run only
    assert commands[1].endswith("--gold-only --name qa-judged-gold")
    assert commands[2].endswith("--keep-top 1 --name qa-judged-keep1")
    (tmp_path / "s2-b" / "checkpoints" / "step-0000300" / "gmsa_config.json").write_text(
        json.dumps({"extra": {"train_config": {"stage": "keft", "doc_order": "bm25_first"}}}))
    del env["FIVE_ARGS"]  # unset: the order the winner trained on
    ordered = subprocess.run(["bash", str(JUDGE), str(tmp_path / "qa"), str(tmp_path / "s2-a"), str(tmp_path / "s2-b")],
                             env=env, capture_output=True, text=True, timeout=120).stdout.strip().splitlines()
    assert ordered[0].endswith("--name qa-judged --keep-top 5") and ordered[1:] == commands[1:]
    missing = subprocess.run(["bash", str(JUDGE), str(tmp_path / "qa")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no run folders" in missing.stderr


def test_every_stage2_ablation_entry_is_a_valid_trainer_command(tmp_path):
    """scripts/stage2_recipe.sh flags: each ablation's trainer flags parse (a typo in a prepared run would otherwise
    cost a GPU session's minutes); entries distilling from a teacher are checked up to the teacher, which needs a run."""
    import shlex

    from gmsa_rag.train import parse_args

    root = SCRIPT.parents[1]
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "INIT": "checkpoints/smollm2-gmsa", "TEACHER": "TEACHER"}
    listed = subprocess.run(["bash", "scripts/stage2_recipe.sh", "flags"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert len(names) == len(set(names)) and {"ranked-more", "ranked-more-dropout", "nocompress"} <= set(names)
    cwd = os.getcwd()
    os.chdir(root)  # (the flags name data/ and checkpoints/ relative to the repository)
    try:
        for line in lines:
            name, *flags = shlex.split(line)
            if "--distill_teacher" in flags:
                at = flags.index("--distill_teacher")
                assert flags[at + 1] == "TEACHER", name
                del flags[at : at + 2]
            cfg = parse_args(flags + ["--out_dir", str(tmp_path / name)])
            assert cfg.stage == "keft", name
    finally:
        os.chdir(cwd)
    only = subprocess.run(["bash", "scripts/stage2_recipe.sh", "flags"], cwd=root, capture_output=True, text=True,
                          env={**env, "ABL_ONLY": "ranked-more-dropout"}, timeout=60)
    assert only.stdout.split()[0] == "ranked-more-dropout" and "--decoder_lora_dropout 0.1" in only.stdout


BRING_BACK = SCRIPT.with_name("gpu_bring_back.sh")


def bring_back(cwd: Path, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BRING_BACK), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_HOME": str(home), "PART_BYTES": "1000", **env})


def paused_run(root: Path) -> Path:
    """A run folder as the trainer leaves it: two checkpoints, `latest` naming the older one (a damaged newer one)."""
    run = root / "runs" / "r" / "s2-long"
    for step, size in (("step-0000100", 5000), ("step-0000200", 300)):
        ckpt = run / "checkpoints" / step
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(os.urandom(size))
        (ckpt / "optimizer.pt").write_bytes(os.urandom(size))
    (run / "latest").write_text("step-0000100")
    (run / "metrics.jsonl").write_text('{"step": 100}\n')
    (run / "train_config.json").write_text("{}")
    (run.parent / "s2-long.log").write_text("log\n")
    return run


def test_a_run_comes_back_in_parts_over_calls_and_unpacks_as_it_was(tmp_path):
    there, home = tmp_path / "there", tmp_path / "home"
    paused_run(there)
    calls = []
    first = "0"
    while first is not None:  # one device call each: $OUT is a fresh folder every time
        out = tmp_path / f"out{len(calls)}"
        out.mkdir()
        packed = bring_back(there, home, "pack", "runs/r/s2-long", first, OUT=str(out))
        assert packed.returncode == 0, packed.stderr
        assert len(list(out.glob("bring-back.part*"))) <= 4 and (out / "bring-back.manifest").is_file()
        calls.append(out)
        nxt = [line for line in packed.stdout.splitlines() if "next call" in line]
        first = nxt[0].split()[-1] if nxt else None
    parts = int((calls[0] / "bring-back.manifest").read_text().split()[2])
    assert len(calls) == -(-parts // 4) >= 2  # ~10 kB of checkpoint in 1,000-byte parts, four a call
    here = tmp_path / "here"
    unpacked = bring_back(tmp_path, home, "unpack", str(here), *map(str, calls))
    assert unpacked.returncode == 0, unpacked.stderr
    back, sent = here / "runs" / "r", there / "runs" / "r"
    for name in ("s2-long/checkpoints/step-0000100/model.safetensors", "s2-long/checkpoints/step-0000100/optimizer.pt",
                 "s2-long/latest", "s2-long/metrics.jsonl", "s2-long/train_config.json", "s2-long.log"):
        assert (back / name).read_bytes() == (sent / name).read_bytes(), name
    assert not (back / "s2-long" / "checkpoints" / "step-0000200").exists()  # only the checkpoint `latest` names


def test_unpack_refuses_missing_or_damaged_parts_in_one_line(tmp_path):
    there, home = tmp_path / "there", tmp_path / "home"
    paused_run(there)
    out = tmp_path / "out"
    out.mkdir()
    assert bring_back(there, home, "pack", "runs/r/s2-long", OUT=str(out)).returncode == 0
    missing = bring_back(tmp_path, home, "unpack", str(tmp_path / "here"), str(out))
    assert missing.returncode == 2 and "part 4 of" in missing.stderr and missing.stderr.count("\n") == 1
    parts = int((out / "bring-back.manifest").read_text().split()[2])
    rest = []
    for first in range(4, parts, 4):
        rest.append(tmp_path / f"rest{first}")
        rest[-1].mkdir()
        assert bring_back(there, home, "pack", "runs/r/s2-long", str(first), OUT=str(rest[-1])).returncode == 0
    damaged = out / "bring-back.part01"  # a part changed on the way (or one of another packing)
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    mixed = bring_back(tmp_path, home, "unpack", str(tmp_path / "here"), str(out), *map(str, rest))
    assert mixed.returncode == 2 and "do not match the manifest" in mixed.stderr
    assert not (tmp_path / "here" / "runs").exists()


def test_pack_without_the_optimizer_and_bad_use(tmp_path):
    there, home = tmp_path / "there", tmp_path / "home"
    paused_run(there)
    out = tmp_path / "out"
    out.mkdir()
    lean = bring_back(there, home, "pack", "runs/r/s2-long", OUT=str(out), OPTIMIZER="0", PART_BYTES="100000")
    assert lean.returncode == 0 and "next call" not in lean.stdout
    here = tmp_path / "here"
    assert bring_back(tmp_path, home, "unpack", str(here), str(out)).returncode == 0
    assert (here / "runs/r/s2-long/checkpoints/step-0000100/model.safetensors").is_file()
    assert not (here / "runs/r/s2-long/checkpoints/step-0000100/optimizer.pt").exists()
    for args, env, message in ((("pack", "runs/r/s2-long"), {}, "device machine"),
                               (("pack", "runs/none"), {"OUT": str(out)}, "no run folder"),
                               (("pack", "runs/r/s2-long", "9"), {"OUT": str(out)}, "only 1 parts"),
                               (("unpack", str(here), str(tmp_path / "nowhere")), {}, "no folder"),
                               (("fetch",), {}, "usage")):
        env = {"OUT": "", **env}
        refused = bring_back(there, home, *args, PART_BYTES="100000", **env)
        assert refused.returncode == 2 and message in refused.stderr and refused.stderr.count("\n") == 1, (args, refused.stderr)
