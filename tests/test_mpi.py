"""lpucore.System over two MPI processes gives what one process gives (cycles, results,
statistics), through the command line: `mpiexec -n 2 python -m lpucore relay --mpi`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lpucore.cli import main

pytest.importorskip("mpi4py")

RELAY = ["relay", "--config", "tiny", "--links", "16", "--topology", "rack", "--vectors", "3"]


def mpiexec():
    exe = Path(sys.executable).parent / "mpiexec"
    return str(exe) if exe.exists() else shutil.which("mpiexec")


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_two_processes_match_one(capsys):
    assert main(RELAY) == 0
    one = last_json(capsys.readouterr().out)
    assert one["processes"] == 1 and one["correct"] and one["hops"] == 71
    exe = mpiexec()
    assert exe, "mpiexec not found: the mpi extra installs it (pip install -e '.[mpi]')"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([exe, "-n", "2", sys.executable, "-m", "lpucore", *RELAY, "--mpi"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    two = last_json(r.stdout)
    assert two["processes"] == 2 and two["correct"]
    for k in ("cycles", "digest", "link_bytes", "windows", "hops"):
        assert two[k] == one[k], k


def test_without_mpi4py_the_error_is_clear(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    from lpucore import mpi
    with pytest.raises(Exception, match=r"MPI runs need mpi4py"):
        mpi.comm_world()


def test_tensor_parallel_compile_over_two_processes_matches_one():
    script = str(Path(__file__).parent / "mpi_tensor_parallel_run.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r1 = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    one = last_json(r1.stdout)
    assert one["exact"] and one["cycles"] == one["expected"] and one["processes"] == 1
    r2 = subprocess.run([mpiexec(), "-n", "2", sys.executable, script, "--mpi"], capture_output=True, text=True,
                        timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr
    two = last_json(r2.stdout)
    assert two["processes"] == 2
    for k in ("cycles", "exact", "c2c_bytes", "digest"):
        assert two[k] == one[k], k
