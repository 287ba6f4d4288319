"""The Slurm batch templates in namelists/: valid bash, and every ``python -m coupler`` line
they run parses with the real ``lodas`` command line (so a renamed subcommand or option breaks
this test, not a job after hours in the queue)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from coupler.cli import build_parser

NAMELISTS = Path(__file__).resolve().parent.parent / "namelists"
TEMPLATES = {
    "slurm_inline.sbatch": {"check", "launch", "run", "diag"},
    "slurm_replay.sbatch": {"check", "replay", "diag"},
}
_COUPLER = re.compile(r"(?:python3?|\$\{?PY\}?\"?) -m coupler ([^|;&<>)\n]*)")


def subcommands() -> set[str]:
    ap = build_parser()
    (sub,) = [a for a in ap._actions if a.choices and a.dest == "command"]
    return set(sub.choices)


def coupler_lines(text: str) -> tuple[list[str], list[str]]:
    """``(commands run, commands mentioned in comments)``: the arguments after ``-m coupler``."""
    text = text.replace("\\\n", " ")
    run, mentioned = [], []
    for line in text.splitlines():
        code = line.lstrip()
        for m in _COUPLER.finditer(code):
            (mentioned if code.startswith("#") else run).append(m.group(1).strip())
    return run, mentioned


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_is_valid_bash(name):
    bash = shutil.which("bash")
    assert bash, "bash not found"
    proc = subprocess.run([bash, "-n", str(NAMELISTS / name)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_commands_exist_in_the_cli(name):
    text = (NAMELISTS / name).read_text()
    run, mentioned = coupler_lines(text)
    known = subcommands()
    assert {shlex.split(c)[0] for c in run} == TEMPLATES[name]
    for cmd in mentioned:
        assert shlex.split(cmd)[0] in known, cmd
    for cmd in run:        # each parses: variables stand for a value
        argv = [re.sub(r"^\$\{?\w+\}?$", "1", tok) for tok in shlex.split(cmd)]
        build_parser().parse_args(argv)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_shape(name):
    text = (NAMELISTS / name).read_text()
    for option in ("--account=<ACCOUNT>", "--partition=<PARTITION>", "--time=", "--nodes="):
        assert re.search(rf"^#SBATCH {re.escape(option)}", text, re.M), option
    assert "set -euo pipefail" in text
    assert re.search(r"^# module load", text, re.M) and re.search(r"^# \. .*activate", text, re.M)
    check = text.index("-m coupler check")
    assert check < text.index("srun $SRUN_MPI")           # validated before the run
    assert "echo \"lodas: output directory: $OUT\"" in text and "echo \"lodas: exit status: $rc\"" in text
    # sbatch reads options up to the first command: every #SBATCH line comes before it
    first_code = next(k for k, l in enumerate(text.splitlines()) if l.strip() and not l.startswith("#"))
    assert all(k < first_code for k, l in enumerate(text.splitlines()) if l.startswith("#SBATCH"))


def test_replay_template_binds_one_gpu_per_task():
    text = (NAMELISTS / "slurm_replay.sbatch").read_text()
    assert "#SBATCH --gpus-per-task=1" in text and "--gpu-bind=per_task:1" in text
    assert "replay \"$NML\" --json" in text
    assert "node_rank % n" in text and "CUDA_VISIBLE_DEVICES" in text
