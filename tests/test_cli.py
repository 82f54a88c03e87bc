"""The mc2-emu command (emu.cli): version, help, unknown commands, each subcommand's flags, the report of a
traced job, and the console script on the venv's PATH."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import mp_cases
from emu.cli import COMMANDS, main
from emu.testing import WorldSpec
from mp_check import check_scenario

pytestmark = pytest.mark.timeout(60)
VERSION = importlib.metadata.version("mc2-emu")
CONSOLE = os.path.join(os.path.dirname(sys.executable), "mc2-emu")

# Each subcommand's --help names these flags.
FLAGS = {
    "dispatch": ("--nproc-per-node", "--removed", "--removed-ranks", "--no-elastic", "--trace", "--soc", "--tp"),
    "run": ("--nproc-per-node", "script.py"),
    "report": ("directory", "--no-pictures"),
    "bench": ("--quick",),
}


def test_version_is_the_installed_distributions(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mc2-emu {VERSION}"


def test_help_lists_the_four_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert COMMANDS == ("dispatch", "run", "report", "bench")
    for cmd in COMMANDS:
        assert f"mc2-emu {cmd}" in out, cmd
    assert "mc2-emu --version" in out


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "mc2-emu dispatch" in capsys.readouterr().out


def test_unknown_command_exits_2_naming_the_valid_ones(capsys):
    assert main(["dispach"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown command 'dispach'" in captured.err
    for cmd in COMMANDS:
        assert cmd in captured.err, cmd


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_subcommand_help_exits_0_and_names_its_flags(cmd, capsys):
    try:
        code = main([cmd, "--help"])
    except SystemExit as exc:                     # argparse's --help exits
        code = exc.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert f"mc2-emu {cmd}" in out
    for flag in FLAGS[cmd]:
        assert flag in out, f"mc2-emu {cmd} --help does not name {flag}"


def test_run_without_a_script_exits_2(capsys):
    assert main(["run"]) == 2
    assert "usage: mc2-emu run" in capsys.readouterr().out


def test_dispatch_rejects_a_bad_flag_before_any_rank_starts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dispatch", "--mask", "foo"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture(scope="module")
def traced_dir(emu_pool, tmp_path_factory):
    """A 2-rank dispatch + combine, traced (as tests/test_trace.py traces its runs)."""
    d = str(tmp_path_factory.mktemp("cli-trace"))
    check_scenario(emu_pool.get(WorldSpec.of(2)), target=mp_cases.traced, run_kwargs={"directory": d},
                   ep=2, moe=2, shared_ranks=0, k=1, bs=4, h=1024)
    return d


def test_report_prints_the_report_of_a_traced_job(traced_dir, capsys):
    assert main(["report", traced_dir, "--no-pictures"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("6 collectives from 2 ranks"), lines[:3]
    assert lines[1].split()[:3] == ["rank", "calls", "colls"]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]


def test_report_on_an_empty_directory_exits_1(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--no-pictures"]) == 1
    assert capsys.readouterr().out.startswith("no trace")


def test_console_script_and_python_m_agree():
    assert os.access(CONSOLE, os.X_OK), f"no console script {CONSOLE}"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    script = subprocess.run(["mc2-emu", "--version"], check=False, capture_output=True, text=True, timeout=50, env=env)
    module = subprocess.run([sys.executable, "-m", "emu.cli", "--version"], check=False, capture_output=True,
                            text=True, timeout=50, env=env)
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout == f"mc2-emu {VERSION}\n"
