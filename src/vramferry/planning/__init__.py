"""Planning: pure arithmetic from sizes, a budget and a device's speeds to a :class:`Plan` with its schedule.

No CUDA calls here: plans are made and tested on the CPU, for any GPU (``vramferry plan --gpu h100``).
"""

from .devices import DeviceProfile, profile_from
from .format import format_plan
from .plan import ComponentPlan, Placement, Plan, plan_from_dict, plan_to_dict
from .planner import default_workload, plan
from .workload import Workload

__all__ = [
    "ComponentPlan",
    "DeviceProfile",
    "Placement",
    "Plan",
    "Workload",
    "default_workload",
    "format_plan",
    "plan",
    "plan_from_dict",
    "plan_to_dict",
    "profile_from",
]
