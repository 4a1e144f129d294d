"""One host read for many statistics: device tensors wait here until the owner reads them all with one ``tolist()``.

Reading a value from a GPU (``.item()``, ``.tolist()``, ``float(t)``) makes the CPU wait until every kernel queued so
far has run: the launch queue empties and the GPU idles while Python catches up. The monitors measure on the device
and hand their tensors over here with what to do with the numbers; whoever drives the steps (the ``Diagnostics``
callback, or a monitor used alone) calls :meth:`BatchedRead.read` at the few steps where a read is due, and every
waiting statistic is read at once: one wait for all of them. Memory is what the waiting tensors hold, O(layers) each.

Nothing here imports Lightning. Example::

    reads = BatchedRead()
    reads.submit(torch.stack(losses), lambda values: print(sum(values) / len(values)))
    reads.submit_scalars([grad_norm_sq, 3.0, None], print)  # tensors, numbers and None (NaN) in one list
    reads.read()  # one host read; then both callbacks run, in the order they were submitted
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

NAN = float("nan")
Use = Callable[[List[float]], None]


class BatchedRead:
    """Device tensors waiting for one batched host read, each with the callable that gets its values."""

    def __init__(self) -> None:
        self._pending: List[Tuple[torch.Tensor, Use]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, values: torch.Tensor, use: Use) -> None:
        """Queue ``values`` (any shape; read flattened, as Python floats); ``use(list_of_floats)`` runs at the read.
        No kernel and no host sync here."""
        self._pending.append((values.detach() if values.requires_grad else values, use))

    def submit_scalars(self, values: Sequence[Union[torch.Tensor, float, int, None]], use: Use) -> None:
        """Queue a list of scalars, some of them tensors (each read as its mean), some Python numbers or ``None``
        (NaN): ``use`` gets them as floats, in the same order. Only the tensors are read from the device."""
        tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        host: List[float] = [NAN if v is None or isinstance(v, torch.Tensor) else float(v) for v in values]
        if not tensors:
            use(host)
            return
        device = tensors[0][1].device
        stacked = torch.stack([_scalar(t, device) for _, t in tensors])

        def fill(read: List[float]) -> None:
            for (i, _), value in zip(tensors, read):
                host[i] = value
            use(host)

        self.submit(stacked, fill)

    def read(self) -> int:
        """Read everything queued with one ``tolist()`` and hand each caller its values, in submission order; returns
        how many submissions were read. An exception in one callable propagates after the others have run."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        device = pending[0][0].device
        parts = [v if v.dim() == 1 and v.device == device else v.reshape(-1).to(device) for v, _ in pending]
        # (torch.cat promotes to the widest dtype: float32 figures are read as the float32 values they are)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        values = flat.tolist()  # the one host read
        error: Optional[BaseException] = None
        start = 0
        for v, use in pending:
            n = v.numel()
            try:
                use(values[start:start + n])
            except Exception as exc:  # the others still get their values
                error = error or exc
            start += n
        if error is not None:
            raise error
        return len(pending)

    def clear(self) -> None:
        self._pending = []


def _scalar(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.detach()
    if t.numel() != 1:
        t = t.double().mean()
    t = t.reshape(()).to(dtype=torch.float64)
    return t if t.device == device else t.to(device)
