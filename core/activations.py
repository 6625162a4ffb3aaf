"""The layer loop's activation buffers: [N, L, hidden] tensors in memory up to a byte
budget, past it in unlinked files on disk read and written batch by batch (`DiskTensor`,
pread/pwrite: no mapping, so the page cache they use is never counted in the process's RSS).
"""
from __future__ import annotations

import os
import tempfile

import torch


class DiskTensor:
    """An [N, ...] tensor in an unlinked temporary file, sliced along dim 0 (pread/pwrite).

    Supports what the layer loop does with activation buffers: `x[lo:hi]` (a tensor on
    `device`), `x[lo:hi] = t`, `.shape`, `.dtype`, `.device`.
    """

    def __init__(self, shape, dtype: torch.dtype, device, directory: str | None = None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.row_bytes = int(torch.Size(self.shape[1:]).numel()) * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="svdforge-act-", suffix=".bin", dir=directory)
        os.unlink(path)   # freed by the OS when closed, even after a crash
        os.ftruncate(fd, self.row_bytes * self.shape[0])
        self.fd = fd

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]

    def _range(self, s) -> tuple[int, int]:
        if not isinstance(s, slice):
            raise TypeError("DiskTensor supports only slices along dim 0")
        lo, hi, step = s.indices(self.shape[0])
        if step != 1:
            raise TypeError("DiskTensor supports only contiguous slices")
        return lo, hi

    def __getitem__(self, s) -> torch.Tensor:
        lo, hi = self._range(s)
        out = torch.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        off, pos = lo * self.row_bytes, 0
        while pos < len(buf):
            n = os.preadv(self.fd, [buf[pos:]], off + pos)
            if n <= 0:
                raise OSError("short read from the activation store")
            pos += n
        return out.to(self.device)

    def __setitem__(self, s, value: torch.Tensor) -> None:
        lo, hi = self._range(s)
        t = value.detach().to("cpu", self.dtype).contiguous()
        if t.shape != (hi - lo, *self.shape[1:]):
            raise ValueError(f"shape {tuple(t.shape)} does not fit rows {lo}:{hi} of {tuple(self.shape)}")
        buf = memoryview(t.view(torch.uint8).numpy()).cast("B")
        off, pos = lo * self.row_bytes, 0
        while pos < len(buf):
            pos += os.pwrite(self.fd, buf[pos:], off + pos)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


class ActivationStore:
    """Allocates the layer loop's [N, L, hidden] buffers: in memory (on `device`) while the
    total stays under `budget_bytes`, else as `DiskTensor`s in `directory`."""

    def __init__(self, device, budget_bytes: float | None = None, directory: str | None = None):
        self.device = device
        self.budget = float("inf") if budget_bytes is None else budget_bytes
        self.directory = directory
        self.in_memory_bytes = 0
        self.on_disk_bytes = 0

    def empty(self, shape, dtype: torch.dtype):
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if self.in_memory_bytes + nbytes <= self.budget:
            self.in_memory_bytes += nbytes
            return torch.empty(shape, dtype=dtype, device=self.device)
        self.on_disk_bytes += nbytes
        return DiskTensor(shape, dtype, self.device, self.directory)

    def empty_like(self, x, dtype: torch.dtype | None = None):
        return self.empty(x.shape, dtype or x.dtype)

    def copy(self, x, dtype: torch.dtype | None = None, batch: int = 8):
        """A new buffer holding x (cast to dtype), copied batch by batch."""
        if torch.is_tensor(x) and (dtype is None or x.dtype == dtype) and self.budget == float("inf"):
            return x.clone()
        out = self.empty_like(x, dtype)
        for lo in range(0, x.shape[0], batch):
            out[lo:lo + batch] = x[lo:lo + batch].to(out.dtype)
        return out

    def cast(self, x, dtype: torch.dtype):
        """x in dtype (x itself when it already is)."""
        return x if x.dtype == dtype else self.copy(x, dtype)

    def report(self) -> dict:
        return {"in_memory_bytes": self.in_memory_bytes, "on_disk_bytes": self.on_disk_bytes,
                "budget_bytes": None if self.budget == float("inf") else int(self.budget)}


def default_activation_budget(device) -> int:
    """A quarter of the memory available now on the device that holds the activations."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.25)
    import psutil

    return int(psutil.virtual_memory().available * 0.25)
