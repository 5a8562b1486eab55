"""Preemption: SIGTERM, SIGINT or SIGUSR1 → finish the step, checkpoint, exit 0.

SLURM (``sbatch --signal``), Kubernetes, spot instances and ``torchrun`` itself stop a run with
a signal. The handler only records it; the training loop asks :meth:`StopRequest.agreed` at every
step boundary, which every rank answers together (``simclr_embed.training.distributed.any_rank``: the signal
may reach ranks at different moments, or only rank 0), so all ranks stop after the same step,
rank 0 writes one ``last.pt``, and nobody waits in a collective the others left. A second signal
while that happens is only logged: the checkpoint is written atomically either way, and torchrun
itself forwards the SIGTERM it got, so a second one is normal. DataLoader workers ignore these
signals (:func:`ignore_in_worker`): a ``kill`` of the process group must not kill them under the
main process, which stops them itself.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from simclr_embed.training import distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Install with :meth:`install`; ``signal_name`` is the first signal received (or None)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s: stopping after the current step (checkpoint, then exit 0)", name)
        else:
            log.warning("%s again: already stopping after the current step", name)

    def agreed(self) -> bool:
        """Whether any rank got a signal; the same answer on every rank (one host all-reduce)."""
        return dist.any_rank(self.signal_name is not None)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the main process decides when workers stop."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
