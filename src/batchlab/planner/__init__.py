"""`batchlab plan`: combine hardware and noise measurements into a batch size, LR and report."""

from batchlab.planner.measure import PartialPlan, PlanInterrupted, PlanRefused, plan
from batchlab.planner.model import build_plan
from batchlab.planner.plan_types import Candidate, Measurements, Plan, Recommendation
from batchlab.planner.trust import PlanWarning

__all__ = [
    "Candidate",
    "Measurements",
    "PartialPlan",
    "Plan",
    "PlanInterrupted",
    "PlanRefused",
    "PlanWarning",
    "Recommendation",
    "build_plan",
    "plan",
]
