"""Values that ride back with a step's one host read of its reduced measurements.

DeepSpeed's global gradient norm after step() is a device tensor; a ``float()`` of it is a host
sync of its own on a GPU (issue 16 item 6). StepMeasurer.end appends such tensors to the packed
vector AFTER its all-reduce (they are global already: a sum would multiply them by the world size)
and reads them back in the same copy, so an unmeasured step still has one host sync; a float64
copy of an fp32/bf16 value is exact, so the column is the ``float(tensor)`` it was before.
"""

from __future__ import annotations

import torch


class Carry:
    """Values end() hands back in the row as Python floats: plain values at once, device tensors
    appended to the reduced vector (``append``) and read back with it (``read``)."""

    def __init__(self, values: dict | None):
        values = values or {}
        self.tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        self._values = [values[k].detach().reshape(()) for k in self.tensors]
        self.row = {k: None if v is None else float(v) for k, v in values.items() if k not in self.tensors}

    def append(self, reduced: torch.Tensor) -> torch.Tensor:
        if not self._values:
            return reduced
        tail = torch.stack([v.to(reduced.device, torch.float64) for v in self._values])
        return torch.cat([reduced, tail])

    def read(self, host_values: list) -> None:
        """The appended values, as read back (Python floats), into ``row``."""
        self.row.update(zip(self.tensors, (float(v) for v in host_values)))
