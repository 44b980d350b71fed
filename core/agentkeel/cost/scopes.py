"""The budget scopes a request spends from, with their windows in ``[budget] timezone``.

- ``per_session_usd``: everything one user spent in one session, ever.
- ``per_user_daily_usd``: what one user spent on one calendar day.
- ``per_principal_monthly_usd``: what one principal spent in one calendar month.

A principal's ``[principals.NAME.budget]`` replaces the ``[budget]`` value of
the same name. The per-request budget (``[budget] default_usd``, ``--budget``)
is held in the run itself (``agentkeel.cost.budget.Budget``).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import TYPE_CHECKING

from agentkeel.cost.store import ScopeLimit

if TYPE_CHECKING:
    from agentkeel.config import Config


def day_window(now: float, timezone: str) -> tuple[float, float]:
    """The calendar day (in ``timezone``) holding ``now``: [start, end) in Unix seconds."""
    zone = zoneinfo.ZoneInfo(timezone)
    local = dt.datetime.fromtimestamp(now, zone)
    start = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
    nxt = start.date() + dt.timedelta(days=1)
    end = dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    return start.timestamp(), end.timestamp()


def month_window(now: float, timezone: str) -> tuple[float, float]:
    """The calendar month (in ``timezone``) holding ``now``: [start, end) in Unix seconds."""
    zone = zoneinfo.ZoneInfo(timezone)
    local = dt.datetime.fromtimestamp(now, zone)
    start = dt.datetime(local.year, local.month, 1, tzinfo=zone)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return start.timestamp(), dt.datetime(year, month, 1, tzinfo=zone).timestamp()


def scopes_for(user_id: str, session_id: str, principal: str, config: Config, now: float) -> list[ScopeLimit]:
    """Every scope limit that applies to a request of ``user_id`` in ``session_id`` as ``principal``."""
    limits = config.limits_for(principal)
    out: list[ScopeLimit] = []
    session = limits.get("per_session_usd")
    if session is not None:
        out.append(ScopeLimit("session", session, f"per_session_usd of session {session_id!r} of user {user_id!r}",
                              user_id=user_id, session_id=session_id))
    daily = limits.get("per_user_daily_usd")
    if daily is not None:
        start, end = day_window(now, config.timezone)
        out.append(ScopeLimit("user_day", daily, f"per_user_daily_usd of user {user_id!r}",
                              user_id=user_id, start=start, end=end, timezone=config.timezone))
    monthly = limits.get("per_principal_monthly_usd")
    if monthly is not None:
        start, end = month_window(now, config.timezone)
        out.append(ScopeLimit("principal_month", monthly, f"per_principal_monthly_usd of principal {principal!r}",
                              principal=principal, start=start, end=end, timezone=config.timezone))
    return out
