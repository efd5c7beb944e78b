"""The GPU benchmark's bf16 peak table: each device name torch reports maps to its datasheet peak,
so MFU is computed on an H200 or A100 too, and an unknown device gets no MFU instead of a wrong one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_gpu", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
)
bench_gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_gpu)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362),
    ],
)
def test_known_gpus_get_their_datasheet_peak(name, tflops):
    assert bench_gpu.peak_for_name(name) == tflops * 1e12


def test_unknown_gpu_gets_no_peak_and_the_flag_wins():
    assert bench_gpu.peak_for_name("NVIDIA GeForce RTX 4090") is None
    assert bench_gpu.peak_flops("cpu", None) is None
    assert bench_gpu.peak_flops("cuda", 123.0) == 123e12  # --peak-tflops, whatever the device
