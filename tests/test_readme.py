"""The README's shell blocks: every `qbridge` command it shows exists and takes the flags it is shown
with, the ones that need nothing from outside run as written, and the quick start's make targets exist."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QBRIDGE = [sys.executable, "-m", "qformer.cli"]
# Lines that run here as written, in a scratch directory; the shrink keeps the suite fast and is the
# only change made to them.
RUNNABLE = {"qbridge --help": {}, "qbridge data shapes": {"--n 5000": "--n 40"}}


def shell_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def qbridge_lines() -> list[str]:
    return [line for line in shell_lines() if line.startswith("qbridge")]


def subcommand(tokens: list[str]) -> list[str]:
    """The leading sub-command words after ``qbridge`` (at most two: ``data shapes``, ``train stage1``)."""
    words = []
    for t in tokens[1:3]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", t):
            break
        words.append(t)
    return words


def test_the_readme_shows_commands():
    lines = qbridge_lines()
    assert len(lines) >= 8 and {"make serve", "make test"} <= set(shell_lines())
    assert all(any(line.startswith(r) for line in lines) for r in RUNNABLE)


@pytest.mark.parametrize("line", qbridge_lines())
def test_each_command_exists_and_takes_its_flags(line):
    tokens = shlex.split(line.replace("|", " "))
    words = subcommand(tokens)
    help_text = subprocess.run([*QBRIDGE, *words, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0, help_text.stderr
    missing = [t for t in tokens if t.startswith("--") and t not in help_text.stdout]
    assert not missing, f"`{line}`: `qbridge {' '.join(words)}` has no {missing}"


@pytest.mark.parametrize("start", sorted(RUNNABLE))
def test_runnable_lines_run_as_written(start, tmp_path):
    (line,) = [line for line in qbridge_lines() if line.startswith(start)]
    for old, new in RUNNABLE[start].items():
        assert old in line
        line = line.replace(old, new)
    done = subprocess.run([*QBRIDGE, *shlex.split(line)[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    if start == "qbridge data shapes":
        out = tmp_path / shlex.split(line)[shlex.split(line).index("--out") + 1]
        assert (out / "captions_train.json").is_file() and (out / "instances_test.json").is_file()


@pytest.mark.parametrize("target", ["serve", "test"])
def test_quick_start_targets_exist(target):
    dry = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
