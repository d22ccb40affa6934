"""Device and dtype choice (saelab.core.devices): auto picks bf16 only where it runs fast, and says why."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.core import devices
from saelab.core.devices import DeviceError, DtypeChoice


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Each test gets its own cache folder and no memoised verdict."""
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    for variable in devices._ISA_VARIABLES:  # the tests may run under the AVX2 emulation
        monkeypatch.delenv(variable, raising=False)
    devices._cpu_choice.cache_clear()
    devices._announced.clear()
    yield
    devices._cpu_choice.cache_clear()


def _cpu(monkeypatch, flags, capability="AVX512", speedup=3.0):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    calls = []

    def bench():
        calls.append(1)
        return speedup

    monkeypatch.setattr(devices, "bf16_speedup", bench)
    return calls


def test_cpu_without_bf16_units_gets_float32_without_a_benchmark(monkeypatch):
    calls = _cpu(monkeypatch, {"avx2", "fma"}, capability="AVX2")
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert calls == []
    assert "without bf16 matrix units" in devices.auto_dtype(torch.device("cpu")).reason


def test_amx_cpu_gets_bfloat16_when_the_benchmark_confirms(monkeypatch):
    calls = _cpu(monkeypatch, {"avx512f", "amx_bf16", "amx_tile"}, speedup=2.8)
    choice = devices.auto_dtype(torch.device("cpu"))
    assert choice == DtypeChoice("bfloat16", choice.reason) and "AMX" in choice.reason
    assert "2.8x" in choice.reason
    assert calls == [1]


def test_units_that_do_not_pay_off_give_float32(monkeypatch):
    _cpu(monkeypatch, {"avx512f", "avx512_bf16"}, speedup=0.9)
    choice = devices.auto_dtype(torch.device("cpu"))
    assert choice.dtype == "float32" and "AVX512-BF16" in choice.reason


def test_the_verdict_is_cached_per_machine_and_environment(monkeypatch, tmp_path):
    calls = _cpu(monkeypatch, {"amx_bf16"}, speedup=2.0)
    devices.auto_dtype(torch.device("cpu"))
    devices._cpu_choice.cache_clear()
    devices.auto_dtype(torch.device("cpu"))
    assert calls == [1]  # the second process reads the file
    saved = json.loads((tmp_path / "cache" / "dtype_choice.json").read_text())["choices"]
    ((key, choice),) = saved.items()
    assert choice["dtype"] == "bfloat16" and json.loads(key)["cpu"] == devices.cpu_model()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")  # another environment: measured again
    devices._cpu_choice.cache_clear()
    devices.auto_dtype(torch.device("cpu"))
    assert calls == [1, 1]
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")  # both verdicts are kept: back to the first, no benchmark
    devices._cpu_choice.cache_clear()
    devices.auto_dtype(torch.device("cpu"))
    assert calls == [1, 1]
    (tmp_path / "cache" / "dtype_choice.json").write_text("{not json")  # corrupt: measured again
    devices._cpu_choice.cache_clear()
    assert devices.auto_dtype(torch.device("cpu")).dtype == "bfloat16"
    assert calls == [1, 1, 1]


def test_an_isa_limit_hides_the_units(monkeypatch):
    calls = _cpu(monkeypatch, {"amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert calls == []


def test_explicit_dtypes_pass_through_and_bad_ones_are_clear():
    assert devices.resolve_dtype("float32", "cpu") == torch.float32
    assert devices.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert devices.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype 'float8'; use auto, bfloat16, float32 or float16"):
        devices.resolve_dtype("float8")


def test_the_choice_is_printed_once_with_its_reason(monkeypatch, capsys):
    _cpu(monkeypatch, {"avx2"}, capability="AVX2")
    devices.resolve_dtype("auto", "cpu")
    devices.resolve_dtype("auto", "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("saelab: dtype auto -> float32 on cpu (CPU without bf16 matrix units")


def test_encoder_dtype_follows_the_model_choice(monkeypatch):
    _cpu(monkeypatch, {"amx_bf16"}, speedup=3.0)
    assert devices.encoder_dtype("auto", "cpu") == "bfloat16"
    assert devices.encoder_dtype("float32", "cpu") == "float32"
    devices._cpu_choice.cache_clear()
    _cpu(monkeypatch, {"avx2"}, capability="AVX2")
    assert devices.encoder_dtype(None, "cpu") == "float32"
    with pytest.raises(DeviceError, match="unknown encoder dtype"):
        devices.encoder_dtype("int8")


def test_devices_resolve_and_refuse_clearly():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if devices._mps_available() else "cpu")
    assert devices.resolve_device("auto").type == expected
    assert devices.resolve_device(None).type == expected
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no usable CUDA GPU"):
            devices.resolve_device("cuda")


def test_the_real_micro_benchmark_is_quick_and_positive():
    """Tiny shape (tests never depend on the CPU's bf16 speed): it runs and returns a ratio."""
    ratio = devices.bf16_speedup(rows=16, budget_s=0.05)
    assert ratio > 0


def test_describe_machine_names_cpu_capability_threads_and_dtype():
    line = devices.describe_machine("float32")
    assert devices.cpu_model() in line
    assert torch.backends.cpu.get_cpu_capability() in line
    assert f"{torch.get_num_threads()} threads" in line and "dtype float32" in line
