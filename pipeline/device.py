"""The one place that decides where models run and in which dtype.

CUDA with bf16 autocast when a GPU is visible, CPU float32 otherwise. Every stage asks
``choose_device()`` / ``autocast(device)`` instead of testing ``torch.cuda`` itself.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: run in float32

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def choose_device(prefer: str = "auto") -> DevicePlan:
    """``prefer`` is ``auto``, ``cpu`` or ``cuda``; ``R2F_DEVICE`` overrides ``auto``."""
    prefer = os.environ.get("R2F_DEVICE", prefer) if prefer == "auto" else prefer
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {prefer!r}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU")
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        return DevicePlan(torch.device("cuda"), torch.bfloat16)
    return DevicePlan(torch.device("cpu"), None)


def autocast(plan: DevicePlan):
    """bf16 autocast on CUDA, a no-op context on CPU (float32 keeps parity with the official code)."""
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.type, dtype=plan.autocast_dtype)


def set_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads and numpy's BLAS threads to ``n`` (default:
    ``R2F_TORCH_THREADS`` or all cores). numpy's OpenBLAS reads its thread count from the
    environment once, at import: a process Ray did not start (the driver, a bench, a test) would
    otherwise run every matrix product (RANSAC's mutual nearest neighbours) on all cores."""
    from threadpoolctl import threadpool_limits

    if n is None:
        n = int(os.environ.get("R2F_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    threadpool_limits(limits=max(1, n), user_api="blas")
    return torch.get_num_threads()


def place_model(model: torch.nn.Module, plan: DevicePlan) -> torch.nn.Module:
    """Move ``model`` to ``plan.device`` through its own ``place`` (which also records the plan its
    forward passes use), so the model's parameters and the device it sends inputs to agree."""
    placed = model.place(plan) if hasattr(model, "place") else model.to(plan.device)
    return placed
