"""Create (once) the reference venv benchmarks/.venv-scvi with scvi-tools 1.4.2 on CPU torch 2.13.

Run: .venv/bin/python benchmarks/vae_scvi_env.py   (prints the venv's python path)
The venv is git-ignored; torch is pinned to the machine's CPU wheel through a constraints file so
scvi-tools does not pull a CUDA build.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-scvi"
SCVI_VERSION = "1.4.2"
PINS = "torch==2.13.0\nanndata>=0.11,<0.13\n"


def scvi_python() -> Path:
    """Path of the reference venv's python, creating and filling the venv on first use."""
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", f"import scvi; assert scvi.__version__ == '{SCVI_VERSION}'"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    constraints = VENV / "constraints.txt"
    constraints.write_text(PINS)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints),
                    f"scvi-tools=={SCVI_VERSION}", "psutil"], check=True)
    subprocess.run(probe, check=True)
    return py


if __name__ == "__main__":
    print(scvi_python())
    sys.exit(0)
