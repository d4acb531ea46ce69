"""The refresh driver: the framework-free control loop both adapters run from their events.

A framework adapter switches its COAP optimizers to external refreshes and then, from its own
events, calls:

* :meth:`RefreshDriver.before_step` when the complete gradient of an optimizer step is there
  (Composer's ``AFTER_TRAIN_BATCH``, Lightning's ``on_before_optimizer_step``): the schedule
  position of that optimizer advances and the refresh due there is requested;
* :meth:`RefreshDriver.after_batch` once the batch's steps ran (``BATCH_END``,
  ``on_train_batch_end``): the requests a step consumed are recorded in
  :attr:`RefreshDriver.refreshes`, the others (a step skipped by the AMP scaler or by a
  wrapper) withdrawn, so none runs later, off the schedule;
* :meth:`RefreshDriver.state_dict` / :meth:`RefreshDriver.load_state_dict` for the adapter's
  checkpoint state, and :meth:`RefreshDriver.check_compatible` before resuming from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .optim import CoapOptimizer
from .settings import CoapSettings
from .translate import find_coap_optimizers

__all__ = ["BatchRefreshes", "DrivenAdapter", "RefreshDriver", "settle_refresh"]


def settle_refresh(optimizer: CoapOptimizer) -> bool:
    """After the batch whose step should have run a requested refresh: whether it did.

    :meth:`~coap_plugins.optim.CoapOptimizer.step` clears the request of every group it runs;
    a request still pending means no step ran (a skipped AMP step, a wrapper that did not call
    the optimizer).  It is withdrawn, so it does not run later, off the schedule.
    """
    pending = [g for g in optimizer.param_groups if g.get("pending_refresh", "none") != "none"]
    for group in pending:
        group["pending_refresh"] = "none"
    return not pending


class BatchRefreshes(NamedTuple):
    """What :meth:`RefreshDriver.after_batch` found: the optimizers whose requested refresh ran,
    and ``(optimizer, step, kind)`` of the requests no step consumed (withdrawn)."""

    ran: list[CoapOptimizer]
    withdrawn: list[tuple[CoapOptimizer, int, str]]


class RefreshDriver:
    """Schedule position, due refreshes and what ran, for the COAP optimizers an adapter drives.

    Args:
        settings: the adapter's settings (``update_interval``, ``reproject_factor``).
        adapter: the adapter's name, for error messages (default ``"CoapAlgorithm"``).
    """

    def __init__(self, settings: CoapSettings, adapter: str = "CoapAlgorithm") -> None:
        self.settings = settings
        self.adapter = adapter
        self.schedule = settings.schedule()
        self.optimizers: list[CoapOptimizer] = []
        self.positions: list[int] = []  # optimizer steps taken under the adapter, per optimizer
        self.refreshes: list[tuple[int, str]] = []  # (step, kind) of the first optimizer's refreshes that ran
        self._requested: list[tuple[int, int, str]] = []  # (index, step, kind) this batch
        self._loaded: dict[str, Any] | None = None

    # -- binding -----------------------------------------------------------------------------
    def bind(self, optimizers: Sequence[CoapOptimizer]) -> None:
        """Drive ``optimizers`` (switched to external refreshes) from position 0, or from the
        positions of a loaded state that has one per optimizer."""
        self.optimizers = list(optimizers)
        for opt in self.optimizers:
            opt.drive_refreshes_externally()
        saved = self._loaded.get("steps") if self._loaded else None
        if isinstance(saved, int):  # written by a version that kept one position
            saved = [saved] * len(self.optimizers)
        if saved and len(saved) == len(self.optimizers):
            self.positions = [int(s) for s in saved]
        else:
            self.positions = [0] * len(self.optimizers)
        self._requested = []

    @property
    def step(self) -> int:
        """The schedule position of the first optimizer."""
        return self.positions[0] if self.positions else 0

    def index_of(self, optimizer: Any) -> int | None:
        """Which driven optimizer ``optimizer`` is, or wraps; ``None`` when none."""
        inner = find_coap_optimizers([optimizer])
        for i, opt in enumerate(self.optimizers):
            if opt is optimizer or any(opt is o for o in inner):
                return i
        return None

    # -- the loop ----------------------------------------------------------------------------
    def before_step(self, index: int) -> str:
        """Advance optimizer ``index`` by one step and request the refresh due there (returns its kind)."""
        step = self.positions[index] + 1
        kind = self.schedule.refresh_at(step)
        if kind != "none":
            self.optimizers[index].request_refresh(kind)
            self._requested.append((index, step, kind))
        self.positions[index] = step
        return kind

    def after_batch(self) -> BatchRefreshes:
        """Settle this batch's requests: record those a step ran, withdraw the others."""
        requested, self._requested = self._requested, []
        ran, withdrawn = [], []
        for index, step, kind in requested:
            opt = self.optimizers[index]
            if settle_refresh(opt):
                ran.append(opt)
                if index == 0:
                    self.refreshes.append((step, kind))
            else:
                withdrawn.append((opt, step, kind))
        return BatchRefreshes(ran, withdrawn)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(
            steps=list(self.positions),
            update_interval=self.settings.interval,
            reproject_factor=self.settings.reproject_factor,
            optimizer_classes=[type(o).__name__ for o in self.optimizers],
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a saved state until :meth:`bind` and :meth:`check_compatible` use it."""
        self._loaded = dict(state)

    @property
    def loaded(self) -> dict[str, Any] | None:
        return self._loaded

    def check_compatible(self) -> None:
        """Refuse a loaded state written with other optimizers or another schedule (ValueError
        naming what differs), then take its positions; a no-op without a loaded state."""
        if self._loaded is None:
            return
        mine = [type(o).__name__ for o in self.optimizers]
        saved = list(self._loaded.get("optimizer_classes", mine))
        if saved != mine:
            raise ValueError(
                f"The checkpoint was written with COAP optimizer(s) {saved} but this {self.adapter} builds {mine}: "
                "the framework would skip the optimizer state. Use the same optimizer/eight_bit settings as the "
                "run that wrote it"
            )
        mine_schedule = {"update_interval": self.settings.interval, "reproject_factor": self.settings.reproject_factor}
        for key, value in mine_schedule.items():
            if key in self._loaded and self._loaded[key] != value:
                raise ValueError(
                    f"The checkpoint was written with {key}={self._loaded[key]} but this {self.adapter} has "
                    f"{key}={value}: "
                    "use the same value"
                )
        self.bind(self.optimizers)
        self._loaded = None


class DrivenAdapter:
    """What an adapter driven by a :class:`RefreshDriver` shows of it (mixed into both adapters)."""

    driver: RefreshDriver

    @property
    def schedule(self) -> Any:
        """The projection schedule (``update_interval``, ``reproject_factor``)."""
        return self.driver.schedule

    @property
    def steps(self) -> int:
        """Optimizer steps of the first COAP optimizer taken under the adapter (the schedule position)."""
        return self.driver.step

    @property
    def refreshes(self) -> list[tuple[int, str]]:
        """``(step, kind)`` of every refresh an optimizer step ran (first optimizer)."""
        return self.driver.refreshes
