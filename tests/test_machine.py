"""The CPU decisions of a launch (toa.servers.machine, LaunchSpec.resolved_dtype,
place_cpu_servers), fed made-up CPUs: the dtype "auto" picks, and how cores are shared out."""

from __future__ import annotations

import pytest
from helpers import AMD_EPYC_AVX2, INTEL_AMX, INTEL_AVX512_NO_BF16, fake_cpu

from toa.config import load_config, place_servers
from toa.plan import run_id
from toa.servers import machine
from toa.servers.machine import cpu_dtype, omp_bind, partition_cores
from toa.servers.spec import LaunchSpec, place_cpu_servers


@pytest.mark.parametrize("flags, arch, expected", [
    (AMD_EPYC_AVX2, "x86_64", "float32"),  # the box where bfloat16 stalled
    (INTEL_AVX512_NO_BF16, "x86_64", "float32"),  # AVX-512 alone is not bf16 compute
    (INTEL_AMX, "x86_64", "bfloat16"),
    (frozenset({"avx512_bf16"}), "x86_64", "bfloat16"),
    (frozenset({"amx_bf16"}), "x86_64", "bfloat16"),
    (frozenset({"asimd", "bf16", "sve"}), "aarch64", "bfloat16"),
    (frozenset({"asimd"}), "aarch64", "float32"),
    (frozenset({"bf16"}), "x86_64", "float32"),  # an aarch64 feature name means nothing on x86
])
def test_auto_dtype_follows_native_bf16(flags, arch, expected):
    assert cpu_dtype(fake_cpu(flags, arch=arch)) == expected


@pytest.mark.parametrize("flags, expected", [(AMD_EPYC_AVX2, "float32"), (INTEL_AMX, "bfloat16")])
def test_launch_spec_resolves_auto_on_cpu_and_keeps_a_given_dtype(monkeypatch, flags, expected):
    monkeypatch.setattr("toa.servers.spec.cpu_info", lambda: fake_cpu(flags))
    auto = LaunchSpec(model="/m", device="cpu")
    assert auto.resolved_dtype() == expected
    assert auto.fingerprint()["dtype"] == expected  # the run id sees what the server computes in
    assert LaunchSpec(model="/m", device="cpu", dtype="bfloat16").resolved_dtype() == "bfloat16"


def test_gpu_auto_dtype_is_the_models_own_with_float32_computed_in_bfloat16(tmp_path):
    spec = LaunchSpec(model=str(tmp_path), device="cuda")
    (tmp_path / "config.json").write_text('{"torch_dtype": "float16"}')
    assert spec.resolved_dtype(str(tmp_path)) == "float16"
    (tmp_path / "config.json").write_text('{"dtype": "float32"}')
    assert spec.resolved_dtype(str(tmp_path)) == "bfloat16"
    assert spec.resolved_dtype() == "auto"  # no folder to read: vLLM decides


@pytest.mark.parametrize("cores, servers, expected", [
    (2, 1, [[0, 1]]),
    (2, 2, [[0], [1]]),  # the default run on a 2-core box: one core each
    (2, 3, [[0], [1], [0]]),  # more servers than cores: round-robin, never all on core 0
    (16, 1, [list(range(14))]),  # 2 of 16 kept for the orchestrator
    (16, 2, [list(range(7)), list(range(7, 14))]),
    (16, 3, [list(range(5)), list(range(5, 10)), list(range(10, 14))]),
])
def test_partition_gives_disjoint_cores_and_keeps_the_orchestrators_share(cores, servers, expected):
    parts = partition_cores(list(range(cores)), servers)
    assert parts == expected
    if servers <= cores:
        flat = [c for p in parts for c in p]
        assert len(flat) == len(set(flat))  # disjoint
        assert all(p for p in parts)


def test_partition_uses_the_cores_this_process_may_use():
    assert partition_cores([4, 5, 6, 7], 2) == [[4, 5], [6, 7]]


def test_omp_bind_splits_tensor_parallel_ranks():
    assert omp_bind([0]) == "0"
    assert omp_bind([2, 3, 4, 5]) == "2,3,4,5"
    assert omp_bind([0, 1, 2, 3], ranks=2) == "0,1|2,3"


def test_cpu_servers_are_placed_and_a_given_cpus_wins(monkeypatch):
    monkeypatch.setattr("toa.servers.spec.cpu_info", lambda: fake_cpu(cores=range(16)))
    specs = {"a": LaunchSpec(model="/a", device="cpu"), "b": LaunchSpec(model="/b", device="cpu", cpus=[15]),
             "c": LaunchSpec(model="/c", device="cpu"), "g": LaunchSpec(model="/g", device="cuda")}
    placed = place_cpu_servers(specs)
    assert placed["b"].cpus == [15]
    assert placed["g"].cpus is None  # nothing changes for GPU servers
    assert placed["a"].cpus == list(range(7)) and placed["c"].cpus == list(range(7, 14))  # 1 of 15 kept back


def test_default_run_places_its_two_servers_on_one_core_each_and_keeps_its_run_id(monkeypatch):
    monkeypatch.setattr("toa.servers.spec.cpu_info", lambda: fake_cpu(AMD_EPYC_AVX2))
    monkeypatch.setattr("toa.servers.spec.gpus", lambda: ())
    cfg = load_config()
    placed = place_servers(cfg)
    assert [a.launch.cpus for a in placed.agents] == [[0], [1]]
    assert [a.launch.resolved_dtype() for a in placed.agents] == ["float32", "float32"]
    assert run_id(placed) == run_id(cfg)  # cores are operational


def test_build_env_binds_threads_only_on_cpu():
    from toa.servers.vllm import build_env

    spec = LaunchSpec(model="/m", device="cpu", cpus=[1])
    assert build_env(spec, "cpu", "k", base={})["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in build_env(spec, "cuda", "k", base={})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in build_env(LaunchSpec(model="/m", device="cpu"), "cpu", "k", base={})


def test_this_machines_cpu_is_read():
    info = machine.cpu_info()
    assert info.cores and info.model != ""
    assert cpu_dtype(info) in ("bfloat16", "float32")
