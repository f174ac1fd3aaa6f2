"""Planning runs from the data (``medkd plan``): nnU-Net's experiment-planning rules for a CPU budget.

:mod:`medkd.plans.topology` (pooling per axis), :mod:`medkd.plans.cost` (step time and memory from MACs),
:mod:`medkd.plans.planner` (configurations from a fingerprint, see :mod:`medkd.data.fingerprint`).
"""

from medkd.plans.cost import Budget
from medkd.plans.planner import plan_dataset

__all__ = ["Budget", "plan_dataset"]
