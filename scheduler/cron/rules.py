"""Cron slots: the instants a cron expression names on a schedule's wall clock, as UTC.

A slot is written ``2026-03-29T01:00:00Z`` (``slot_str``); it is part of the idempotency key of the
job it fires, so it must be the same in every scheduler process. Five fields are standard cron
(minute hour day month weekday); a sixth field is seconds (croniter's form, last), so
``* * * * * */5`` fires every five seconds.

Daylight saving follows ISC (Vixie) cron, cron(8). A schedule is a *wildcard* one when its minute
or hour field starts with ``*`` (``*/15 * * * *``, ``0 * * * *``); otherwise it names fixed times
(``30 1 * * *``).

- Spring forward (Europe/London, 2026-03-29, 01:00-02:00 does not exist): a fixed-time slot in the
  gap fires once, at the instant the clocks jump (``30 1 * * *`` -> ``2026-03-29T01:00:00Z``, which
  is 02:00 BST); a wildcard schedule skips the wall times that do not exist.
- Fall back (2026-10-25, 01:00-02:00 happens twice): a fixed-time slot fires once, in the first
  pass (``30 1 * * *`` -> ``2026-10-25T00:30:00Z``); a wildcard schedule fires in both passes, as
  elapsed time goes on (``*/30 * * * *`` -> 00:00Z, 00:30Z, 01:00Z, 01:30Z). Both passes have
  distinct UTC slots, so both jobs have distinct keys; a fixed-time schedule has one slot, one job.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

UTC = UTC
SLOT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SECOND = timedelta(seconds=1)
_SEARCH_WINDOWS = (timedelta(days=2), timedelta(days=400), timedelta(days=3000))


def slot_str(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime(SLOT_FORMAT)


def parse_slot(slot: str) -> datetime:
    return datetime.strptime(slot, SLOT_FORMAT).replace(tzinfo=UTC)


def as_utc(dt: datetime) -> datetime:
    """Aware UTC; a naive value (SQLite returns them) is taken as UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


@dataclass(frozen=True)
class Cron:
    expr: str
    tz: ZoneInfo

    @classmethod
    def parse(cls, expr: str, tz: str = "UTC") -> Cron:
        """Raise ValueError naming the field ("cron" or "timezone") for a bad expression or zone."""
        expr = " ".join(str(expr).split())
        if expr == "@reboot":
            raise ValueError("cron: @reboot has no slots")
        if not expr.startswith("@") and len(expr.split()) not in (5, 6):
            raise ValueError(f"cron: {expr!r} has {len(expr.split())} fields; give 5 (minute hour day month "
                             "weekday) or 6 (the same, then seconds)")
        if not expr.startswith("@"):
            _check_fields(expr)
        if not croniter.is_valid(expr):
            raise ValueError(f"cron: {expr!r} is not a valid cron expression")
        try:
            zone = ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: {tz!r} is not an IANA timezone (e.g. Europe/London, UTC)") from None
        try:
            croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"cron: {expr!r} never fires") from None
        return cls(expr, zone)

    @cached_property
    def wildcard(self) -> bool:
        """ISC cron's wildcard job: repeated wall times fire twice, skipped ones not at all."""
        minute, hour = croniter(self.expr, datetime(2000, 1, 1)).expressions[:2]
        return minute.startswith("*") or hour.startswith("*")

    # ---- slots ---------------------------------------------------------------------------------

    def slots(self, after: datetime, until: datetime, *, newest: int | None = None) -> list[datetime]:
        """Slots in (after, until], oldest first; with ``newest=k`` only the k newest, found walking back."""
        after, until = as_utc(after), as_utc(until)
        if until <= after:
            return []
        lo_off, hi_off = _offset_range(self.tz, after, until)
        wall_lo = _wall(after, lo_off)
        it = croniter(self.expr, _wall(until, hi_off).replace(microsecond=0) + _SECOND)
        found: set[datetime] = set()
        kept: list[datetime] = []  # with ``newest``: a min-heap of the k newest so far
        while True:
            wall = it.get_prev(datetime)
            # An instant is at most wall - lo_off: walls at or below these bounds cannot add a slot.
            if wall <= wall_lo or (newest and len(kept) >= newest and wall <= _wall(kept[0], lo_off)):
                break
            for u in self.instants(wall):
                if after < u <= until and u not in found:
                    found.add(u)
                    if newest:
                        heapq.heappush(kept, u)
                        if len(kept) > newest:
                            found.discard(heapq.heappop(kept))
        return sorted(found)

    def latest(self, at: datetime) -> datetime | None:
        """The newest slot at or before ``at``."""
        for window in _SEARCH_WINDOWS:
            if found := self.slots(as_utc(at) - window, at, newest=1):
                return found[0]
        return None

    def next_after(self, after: datetime) -> datetime | None:
        """The first slot after ``after``."""
        after = as_utc(after)
        for window in _SEARCH_WINDOWS:
            until = after + window
            lo_off, hi_off = _offset_range(self.tz, after, until)
            it = croniter(self.expr, _wall(after, lo_off).replace(microsecond=0))
            best: datetime | None = None
            while True:
                wall = it.get_next(datetime)
                # An instant is at least wall - hi_off: past these bounds nothing comes earlier.
                if wall > _wall(until, hi_off) or (best is not None and wall > _wall(best, hi_off)):
                    break
                for u in self.instants(wall):
                    if after < u <= until and (best is None or u < best):
                        best = u
            if best is not None:
                return best
        return None

    def instants(self, wall: datetime) -> list[datetime]:
        """The UTC instants at which wall-clock time ``wall`` fires: none, one or two (see the module doc)."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if first.astimezone(self.tz).replace(tzinfo=None) != wall:  # in a spring-forward gap
            return [] if self.wildcard else [_transition(self.tz, second, first)]
        return [first, second] if self.wildcard else [first]  # the repeated hour of a fall-back


# (name, lowest value, highest value) of each field; a sixth field is seconds.
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7),
           ("second", 0, 59))


def _check_fields(expr: str) -> None:
    """Numbers in range in every field, and steps from 1 to the field's highest value: croniter takes
    ``*/61`` (it then fires at minute 0 only) and says of ``0 25 * * *`` only that it is not valid.
    Names (``jan``, ``mon``) and croniter's extensions (``L``, ``W``, ``#``) are left to croniter."""
    for (name, lo, hi), field in zip(_FIELDS, expr.split(), strict=False):
        for part in field.split(","):
            values, _, step = part.partition("/")
            if step.isdigit() and not 1 <= int(step) <= hi:
                raise ValueError(f"cron: {expr!r}: {name} step /{int(step)} is out of range (1-{hi})")
            for value in values.split("-"):
                if value.isdigit() and not lo <= int(value) <= hi:
                    raise ValueError(f"cron: {expr!r}: {name} {int(value)} is out of range ({lo}-{hi})")


def _wall(instant: datetime, offset: timedelta) -> datetime:
    """A naive wall-clock time: ``instant`` shifted by ``offset``."""
    return (instant.astimezone(UTC) + offset).replace(tzinfo=None)


def _offset_range(tz: ZoneInfo, a: datetime, b: datetime) -> tuple[timedelta, timedelta]:
    """The smallest and largest UTC offsets in force between a and b (sampled: no offset lasts under an hour)."""
    step = max(timedelta(hours=1), (b - a) / 2000)
    offsets = {_utcoffset(b, tz)}
    t = a
    while t < b:
        offsets.add(_utcoffset(t, tz))
        t += step
    return min(offsets), max(offsets)


def _utcoffset(t: datetime, tz: ZoneInfo) -> timedelta:
    offset = t.astimezone(tz).utcoffset()
    assert offset is not None  # an aware datetime in a ZoneInfo always has one
    return offset


def _transition(tz: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first whole second in (before, after] that has ``after``'s offset: where the clocks jumped."""
    target = after.astimezone(tz).utcoffset()
    while after - before > _SECOND:
        mid = (before + (after - before) / 2).replace(microsecond=0)
        if mid.astimezone(tz).utcoffset() == target:
            after = mid
        else:
            before = mid
    return after
