"""The cost model of one pipeline together with what it is planned for: the inventory and the configuration."""

from __future__ import annotations

from ..config import OffloadConfig
from ..discovery.inventory import Inventory
from .costmodel import PipelineCost
from .devices import DeviceProfile
from .workload import Workload


class PlanContext(PipelineCost):
    """The cost model of this pipeline, with the inventory and the configuration it is planned for."""

    def __init__(
        self,
        inventory: Inventory,
        config: OffloadConfig,
        device: DeviceProfile,
        workload: Workload,
        budget: int | None,
        ratios: dict[str, float] | None = None,
        mapped: dict[str, tuple[bool, ...]] | None = None,
    ) -> None:
        super().__init__(
            inventory.components,
            inventory.order,
            device,
            workload,
            budget,
            config.prefetch_components,
            exclusive=config.exclusive,
            ratios=ratios,
            mapped=mapped,
        )
        self.inventory = inventory
        self.config = config
