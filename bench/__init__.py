"""Benchmark harness: simulate a smaller card, sample peak memory, run workloads, record results.

Generic pieces (`ballast`, `nvml_peak`, `results`, `table`) know nothing of ComfyUI; workload runners
(`comfy_core_flux`) import ComfyUI in their own process; `anchor` is the CLI that ties them together.
"""
