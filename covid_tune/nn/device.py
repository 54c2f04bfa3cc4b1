"""Where a model runs (CPU, CUDA, MPS) and the speed-ups that apply there."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch



@dataclass
class Device:
    """Where a model runs and the GPU-only speed-ups that apply there."""

    torch: torch.device
    amp_dtype: torch.dtype | None
    """bf16 (or fp16 where bf16 is not supported) on a GPU; ``None`` on the CPU."""
    channels_last: bool

    @classmethod
    def pick(cls) -> Device:
        if not torch.cuda.is_available():
            return cls(torch.device("cpu"), None, False)
        torch.backends.cudnn.benchmark = True
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cls(torch.device("cuda"), amp, True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch.type, dtype=self.amp_dtype)
