"""The per-key usage chart: decrypts per day over a window, stacked by key version, laid
out here and drawn as SVG by the template (no script, no inline style)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta

from kms.services.model import UsageDay

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 36
PALETTE = 6  # CSS classes series-0 .. series-5


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    label: str  # the bar's title: day, version, count


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    bottom: float  # y of the x axis
    right: float  # x where the axes end
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[int, str]]  # (version, css class)
    totals: dict[int, int]  # version -> decrypts in the window
    table: list[tuple[str, int, int]]  # (day, version, decrypts), days with use

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def series(version: int) -> str:
    return f"series-{version % PALETTE}"


def usage_chart(days: list[UsageDay], today: date, span: int = 30) -> Chart:
    """Lay out ``span`` days ending ``today`` (days without use stay empty): one column
    per day, one segment per version, oldest version at the bottom."""
    first = today - timedelta(days=span - 1)
    per_day: dict[str, dict[int, int]] = defaultdict(dict)
    for d in days:
        if first.isoformat() <= d.day <= today.isoformat() and d.decrypts > 0:
            per_day[d.day][d.version] = per_day[d.day].get(d.version, 0) + d.decrypts
    peak = max((sum(v.values()) for v in per_day.values()), default=0)
    scale_max = max(peak, 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / span
    base = TOP + plot_h
    bars: list[Bar] = []
    x_ticks: list[Tick] = []
    totals: dict[int, int] = defaultdict(int)
    for i in range(span):
        day = (first + timedelta(days=i)).isoformat()
        x = LEFT + i * step
        if (span - 1 - i) % 7 == 0:  # weekly, ending today
            x_ticks.append(Tick(round(x + step / 2, 2), day[5:]))
        y: float = base
        for version, count in sorted(per_day.get(day, {}).items()):
            h = plot_h * count / scale_max
            y -= h
            totals[version] += count
            bars.append(
                Bar(
                    round(x + step * 0.1, 2),
                    round(y, 2),
                    round(step * 0.8, 2),
                    round(h, 2),
                    series(version),
                    f"{day}: version {version}, {count} decrypt{'s' if count != 1 else ''}",
                )
            )
    y_ticks = [Tick(base, "0")]
    if peak:
        y_ticks.append(Tick(TOP, str(peak)))
        if peak >= 2:
            half = peak // 2
            y_ticks.insert(1, Tick(base - plot_h * half / scale_max, str(half)))
    table = sorted((day, v, n) for day, vs in per_day.items() for v, n in vs.items())
    return Chart(
        WIDTH,
        HEIGHT,
        LEFT,
        base,
        WIDTH - RIGHT,
        bars,
        x_ticks,
        y_ticks,
        [(v, series(v)) for v in sorted(totals)],
        dict(sorted(totals.items())),
        table,
    )
