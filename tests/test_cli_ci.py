"""README's two first-screen commands and .ci/run agree, and .ci/run refuses "no tests"."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_first_screen_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "scdist run examples/quickstart.yaml" in cmds[0]
    assert all("-c constraints.txt" in c for c in cmds)
    assert "pytest" in cmds[1]
    head = (REPO / "README.md").read_text().split("## ")[0]
    assert "```bash" in head  # both on the first screen, before any section


def test_ci_runs_exactly_the_readme_test_command():
    test_step = _readme_commands()[1].split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_step)}( </dev/null)?$", ci, flags=re.M), test_step
    install_step = _readme_commands()[1].split("&&")[1].strip()
    assert install_step in ci
    assert "python3 -m venv .venv" in ci
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)


def test_ci_fails_when_pytest_collects_nothing(tmp_path):
    """Run .ci/run in a scratch tree whose venv is a stub: pytest's exit 5 must fail CI."""
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", tree / ".ci" / "run")
    bin_ = tree / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "pip").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "python").write_text("#!/bin/sh\nexit ${FAKE_PYTEST_RC}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    fake_py3 = tmp_path / "fakebin"
    fake_py3.mkdir()
    (fake_py3 / "python3").write_text("#!/bin/sh\nexit 0\n")  # "creates" the (already stubbed) venv
    (fake_py3 / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_py3}:{os.environ['PATH']}"}
    for rc, expect in ((5, 1), (0, 0), (1, 1)):
        proc = subprocess.run(["bash", str(tree / ".ci" / "run")], env={**env, "FAKE_PYTEST_RC": str(rc)},
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == expect, (rc, proc.stdout, proc.stderr)
        if rc == 5:
            assert "collected no tests" in proc.stderr
