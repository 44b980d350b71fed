"""Compatibility: the plan wire format moved to ``agentkeel.planner.plan``.

Plugins written against earlier releases import ``parse_plan`` and
``PlanTemplate`` from here; new code imports them from ``agentkeel``.
"""

from agentkeel.planner.plan import PlanTemplate, parse_plan, plan_from_dict

__all__ = ["PlanTemplate", "parse_plan", "plan_from_dict"]
