"""The dashboard's numbers: verdicts per decision and category over the last hours (from the
per-minute counters the publisher writes, ``keys.stats_minute``; the stream is never
scanned), the moderation queue's depth, the review backlog and the dead letters; and the
geometry of its charts, drawn as inline SVG by the template (no chart library)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from modgate import keys
from modgate.contract import MODERATE_QUEUE

MAX_HOURS = 48
DECISIONS = ("safe", "review", "unsafe")
# "none": verdicts without a decision (errors the policy does not send to review).
COLOURS = {"safe": "#3a7d44", "review": "#d59f0f", "unsafe": "#b3261e", "none": "#6b6b6b"}


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


@dataclass
class Dashboard:
    hours: int
    totals: dict[str, int]
    decisions: dict[str, int]
    statuses: dict[str, int]
    categories: dict[str, int]
    queue_depth: int
    review_backlog: int
    dead_letters: int
    # One column per hour, oldest first: decision -> count.
    per_hour: list[dict[str, int]] = field(default_factory=list)
    hour_labels: list[str] = field(default_factory=list)

    def decision_bars(self, width: float = 720, height: float = 160) -> list[Bar]:
        """Stacked bars (one per hour) of verdicts by decision, those without one on top."""
        peak = max((h.get("total", 0) for h in self.per_hour), default=0) or 1
        step = width / max(len(self.per_hour), 1)
        bars = []
        for i, hour in enumerate(self.per_hour):
            y = height
            decided = sum(hour.get(d, 0) for d in DECISIONS)
            for name in (*DECISIONS, "none"):
                count = hour.get(name, 0) if name != "none" else max(hour.get("total", 0) - decided, 0)
                if not count:
                    continue
                h = count / peak * height
                y -= h
                bars.append(
                    Bar(
                        i * step + 1,
                        y,
                        max(step - 2, 1),
                        h,
                        COLOURS[name],
                        f"{self.hour_labels[i]} {name}: {count}",
                    )
                )
        return bars

    def category_bars(self, width: float = 480, row: float = 22) -> list[tuple[str, int, float, float]]:
        """(name, count, y, bar width) per flagged category, largest first."""
        peak = max(self.categories.values(), default=0) or 1
        ranked = sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(name, n, i * row, n / peak * width) for i, (name, n) in enumerate(ranked)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def build(redis: Any, hours: int, now: float | None = None) -> Dashboard:
    """Read the last ``hours`` hours of counters (``hours`` × 60 hashes, one round trip) and
    the backlog figures."""
    hours = max(1, min(int(hours), MAX_HOURS))
    current = int((now if now is not None else time.time()) // 60)
    minutes = [current - i for i in range(hours * 60 - 1, -1, -1)]  # oldest first
    pipe = redis.pipeline(transaction=False)
    for minute in minutes:
        pipe.hgetall(keys.stats_minute(minute))
    pipe.llen(MODERATE_QUEUE)
    pipe.zcard(keys.REVIEW_QUEUE)
    pipe.xlen(keys.WEBHOOK_DEAD_STREAM)
    *counts, depth, backlog, dead = pipe.execute()
    totals = {"total": 0}
    decisions = dict.fromkeys(DECISIONS, 0)
    statuses: dict[str, int] = {}
    categories: dict[str, int] = {}
    per_hour = [{} for _ in range(hours)]
    for index, counters in enumerate(counts):
        hour = per_hour[index // 60]
        for raw_name, raw_value in counters.items():
            name, value = _text(raw_name), int(raw_value)
            kind, _, label = name.partition(":")
            if name == "total":
                totals["total"] += value
                hour["total"] = hour.get("total", 0) + value
            elif kind == "decision":
                decisions[label] = decisions.get(label, 0) + value
                hour[label] = hour.get(label, 0) + value
            elif kind == "status":
                statuses[label] = statuses.get(label, 0) + value
            elif kind == "category":
                categories[label] = categories.get(label, 0) + value
    start = minutes[0] * 60
    labels = [time.strftime("%H:%M", time.gmtime(start + i * 3600)) for i in range(hours)]
    return Dashboard(
        hours=hours,
        totals=totals,
        decisions=decisions,
        statuses=statuses,
        categories=categories,
        queue_depth=int(depth),
        review_backlog=int(backlog),
        dead_letters=int(dead),
        per_hour=per_hour,
        hour_labels=labels,
    )
