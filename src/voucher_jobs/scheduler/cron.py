"""Cron schedules: parsing, validation and fire times in an IANA time zone.

The dialect is cronie's five-field crontab syntax, checked here so that an
error names the setting, its value and the field at fault. cronsim computes
the fire times. This module passes it a rewritten expression that means the
same as cronie's, and filters its output (see `_utc_fire_times`).

Daylight saving time follows cronie's split between two kinds of job:

- A fixed-time job (neither the minute nor the hour field starts with `*`)
  runs at wall-clock times. A wall time that occurs twice runs once, at its
  first occurrence. A wall time skipped in spring runs once, right after
  the gap, and several skipped wall times of one gap merge into that one run.
- Any other job runs on real elapsed time: it fires at every instant whose
  wall-clock time matches, so `*/15 * * * *` keeps 15-minute gaps in UTC
  across both changes.

docs/scheduling.md has examples.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from voucher_jobs.config import ENV_NAMES, ConfigError, Settings

UTC = timezone.utc

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN",
               "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
ZONE_SETTING = ENV_NAMES["schedule_timezone"]
EXAMPLE = "Use five fields, minute hour day-of-month month day-of-week, such as '0 2 * * *'."

# Number of days in each month, with February in a leap year.
_MONTH_LENGTHS = {month: calendar.monthrange(2000, month)[1] for month in range(1, 13)}
# Any fixed instant works for the never-fires probe. An expression that fires
# at all fires again within 40 years (the longest gap, for 29 February on a
# given weekday), and cronsim searches 50 years ahead.
_PROBE_START = datetime(2000, 1, 1, tzinfo=UTC)
_TINY = timedelta(microseconds=1)
# How far apart _offset_change looks at the UTC offset when it searches for
# a daylight saving time change between two fire times.
SCAN_STEP = timedelta(hours=6)


class ScheduleError(ConfigError):
    """An invalid cron expression or time zone, naming the setting, value and field."""

    def __init__(self, setting: str, value: str, reason: str, field: str | None = None,
                 hint: str = EXAMPLE) -> None:
        self.setting = setting
        self.value = value
        self.field = field
        self.reason = reason
        super().__init__(f"{setting}={value!r} is invalid: {reason}. {hint}".rstrip())


class _FieldError(Exception):
    """A problem in one field. Schedule adds the setting and value."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()

    def number(self, token: str, text: str) -> int:
        """Parse one number or three-letter name of this field."""
        if not token:
            raise _FieldError(f"the {self.name} field {text!r} has a range or step with "
                              "a missing number")
        if token.isdigit():
            value = int(token)
        elif token.upper() in self.names:
            value = self.names.index(token.upper()) + (1 if self.name == "month" else 0)
        elif token.isalpha() and self.names:
            raise _FieldError(
                f"the {self.name} field {text!r} contains {token!r}, which is not a number "
                f"or a three-letter name ({self.names[0]}-{self.names[-1]})")
        else:
            raise _FieldError(f"the {self.name} field {text!r} contains {token!r}, "
                              "which is not a number")
        if not self.low <= value <= self.high:
            raise _FieldError(f"the {self.name} field {text!r} contains {value}, outside "
                              f"the range {self.low}-{self.high}")
        return value


FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, MONTH_NAMES),
    # 0 and 7 are both Sunday.
    _Field("day-of-week", 0, 7, DAY_NAMES),
)


def _parse_field(field: _Field, text: str) -> tuple[str, set[int]]:
    """Return the field rewritten with numbers only, and the values it matches."""
    _reject_extensions(field, text)
    items: list[str] = []
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _FieldError(f"the {field.name} field {text!r} has an empty list item")
        rewritten, matched = _parse_item(field, text, item)
        items.append(rewritten)
        values |= matched
    if field.name == "day-of-week" and values & {0, 7}:
        values |= {0, 7}
    return ",".join(items), values


def _reject_extensions(field: _Field, text: str) -> None:
    for char in text:
        if char.isalnum() or char in "*/-,":
            continue
        if char in "#?":
            raise _FieldError(
                f"the {field.name} field {text!r} uses {char!r}, a Quartz extension that "
                "cron does not support")
        if char == "~":
            raise _FieldError(
                f"the {field.name} field {text!r} uses '~', a random value, which would "
                "give each replica a different fire time")
        raise _FieldError(f"the {field.name} field {text!r} contains {char!r}, which cron "
                          "does not allow")


def _reject_last_and_weekday(field: _Field, text: str, base: str) -> None:
    # L and W are letters, so without this check they read as unknown names.
    upper = base.upper()
    if field.name in ("day-of-month", "day-of-week") and (
        upper in ("L", "LW") or upper[-1:] in ("L", "W") and upper[:-1].isdigit()
    ):
        raise _FieldError(f"the {field.name} field {text!r} uses L or W, Quartz extensions "
                          "that cron does not support")


def _parse_item(field: _Field, text: str, item: str) -> tuple[str, set[int]]:
    base, slash, step_text = item.partition("/")
    _reject_last_and_weekday(field, text, base)
    step = 1
    if slash:
        if not step_text.isdigit():
            raise _FieldError(f"the {field.name} field {text!r} has the step {step_text!r}, "
                              "which is not a whole number")
        step = int(step_text)
        if step == 0:
            raise _FieldError(f"the {field.name} field {text!r} has a step of 0, "
                              "but a step must be 1 or more")
    if base == "*":
        start, end = field.low, field.high
        rewritten = "*"
    else:
        first, dash, last = base.partition("-")
        start = field.number(first, text)
        if dash:
            end = field.number(last, text)
            # cronie reads a day-of-week range that ends on Sunday (0 or SUN)
            # as ending on 7, so FRI-SUN is Friday to Sunday.
            if field.name == "day-of-week" and end == 0 and start > 0:
                end = 7
            if start > end:
                raise _FieldError(f"the {field.name} field {text!r} has the range {base}, "
                                  "whose start is after its end")
        else:
            # A lone start with a step, 5/15, runs to the end of the field.
            end = field.high if slash else start
        rewritten = f"{start}-{end}" if dash or slash else str(start)
    if slash:
        rewritten = f"{rewritten}/{step}"
    return rewritten, set(range(start, end + 1, step))


def _parse_zone(zone: str | ZoneInfo, setting: str) -> ZoneInfo:
    if isinstance(zone, ZoneInfo):
        return zone
    try:
        return ZoneInfo(zone.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(setting, zone, "it is not an IANA time zone name",
                            hint="Use a name such as UTC or Europe/Berlin.") from None


@dataclass(frozen=True)
class FireTime:
    """One instant at which a schedule fires."""

    utc: datetime
    local: datetime
    # True when the zone's UTC offset changes on the local date of this fire
    # time, which in most zones means a daylight saving time start or end.
    dst_change_day: bool


class Schedule:
    """A validated cron expression in an IANA time zone.

    Raises ScheduleError naming `setting` (or `zone_setting` for the zone)
    when the expression or zone is invalid or the expression never fires.
    """

    def __init__(self, expression: str, zone: str | ZoneInfo = "UTC", *,
                 setting: str = "cron expression", zone_setting: str = ZONE_SETTING) -> None:
        self.expression = expression
        self.setting = setting
        self.zone = _parse_zone(zone, zone_setting)
        text = expression.strip()
        if text.startswith("@"):
            text = self._expand_macro(text)
        parts = text.split()
        if len(parts) != len(FIELDS):
            raise ScheduleError(setting, expression, self._count_reason(len(parts)))
        rewritten = []
        values = []
        for field, part in zip(FIELDS, parts):
            try:
                field_text, field_values = _parse_field(field, part)
            except _FieldError as exc:
                raise ScheduleError(setting, expression, str(exc), field.name) from None
            rewritten.append(field_text)
            values.append(field_values)
        self.cron = " ".join(rewritten)
        # cronie's fixed-time jobs: neither minute nor hour starts with '*'.
        self.fixed_time = not parts[0].startswith("*") and not parts[1].startswith("*")
        self._check_fires(parts, values)

    @property
    def zone_name(self) -> str:
        return self.zone.key

    def _expand_macro(self, text: str) -> str:
        macro = text.lower()
        if macro in MACROS:
            return MACROS[macro]
        if macro == "@reboot":
            reason = "@reboot has no fire times, so the scheduler cannot run it"
        else:
            reason = f"{text!r} is not a known macro"
        raise ScheduleError(self.setting, self.expression, reason,
                            hint=f"Use one of {', '.join(MACROS)} or a five-field "
                            "expression such as '0 2 * * *'.")

    @staticmethod
    def _count_reason(count: int) -> str:
        if count == 0:
            return "it is empty"
        noun = "field" if count == 1 else "fields"
        reason = f"it has {count} {noun}, but a cron expression has five"
        if count == 6:
            reason += ", and a seconds or year field is not supported"
        return reason

    def _check_fires(self, parts: list[str], values: list[set[int]]) -> None:
        days, months = values[2], values[3]
        # cronie's rule: when either day field starts with '*', a day must
        # match both fields, so the day of month must exist in some month.
        both_days_must_match = parts[2].startswith("*") or parts[4].startswith("*")
        if both_days_must_match and min(days) > max(_MONTH_LENGTHS[m] for m in months):
            raise ScheduleError(
                self.setting, self.expression,
                f"the day-of-month field {parts[2]!r} names no day that exists in the "
                f"month field {parts[3]!r}, so the schedule never fires", "day-of-month")
        try:
            next(iter(CronSim(self.cron, _PROBE_START)))
        except (StopIteration, CronSimError) as exc:
            # NOTE: the checks above should make this unreachable. It guards
            # against rules of cronsim that this module does not mirror.
            raise ScheduleError(self.setting, self.expression,
                                f"cronsim cannot compute a fire time ({exc or 'none found'})"
                                ) from None

    def __repr__(self) -> str:
        return f"Schedule({self.expression!r}, {self.zone_name!r})"

    def fire_times(self, after: datetime) -> Iterator[FireTime]:
        """Yield the fire times strictly after `after` (timezone-aware), in order."""
        for utc in self._utc_fire_times(after):
            yield self._fire_time(utc)

    def next_fire_times(self, after: datetime, count: int) -> list[FireTime]:
        """Return the next `count` fire times strictly after `after`."""
        result: list[FireTime] = []
        if count <= 0:
            return result
        for fire in self.fire_times(after):
            result.append(fire)
            if len(result) == count:
                break
        return result

    def next_fire_time(self, after: datetime) -> FireTime:
        """Return the first fire time strictly after `after`."""
        return next(self.fire_times(after))

    def latest_fire_time(self, at: datetime, *, not_before: datetime) -> FireTime | None:
        """Return the latest fire time in [not_before, at], or None when there is none."""
        at, not_before = _require_aware(at), _require_aware(not_before)
        window = timedelta(hours=2)
        while True:
            start = max(at - window, not_before)
            latest = None
            for utc in self._utc_fire_times(start - timedelta(microseconds=1)):
                if utc > at:
                    break
                latest = utc
            if latest is not None:
                return self._fire_time(latest)
            if start <= not_before:
                return None
            # Widening by 8 keeps dense schedules cheap (the first window
            # finds them) and reaches a yearly fire time in a few rounds.
            window *= 8

    def count_fire_times(self, after: datetime, until: datetime, limit: int) -> int:
        """Count fire times in (after, until], stopping at `limit`."""
        until = _require_aware(until)
        count = 0
        for utc in self._utc_fire_times(after):
            if utc > until or count >= limit:
                break
            count += 1
        return count

    def dst_change_day(self, day: date) -> bool:
        """Return whether the zone's UTC offset changes during the local date `day`."""
        offsets = set()
        for moment in (time(0), time(23, 59, 59, 999999)):
            for fold in (0, 1):
                local = datetime.combine(day, moment, tzinfo=self.zone).replace(fold=fold)
                offsets.add(local.utcoffset())
        return len(offsets) > 1

    def _fire_time(self, utc: datetime) -> FireTime:
        local = utc.astimezone(self.zone)
        return FireTime(utc=utc, local=local, dst_change_day=self.dst_change_day(local.date()))

    def _utc_fire_times(self, after: datetime) -> Iterator[datetime]:
        """Yield UTC fire times strictly after `after`, strictly increasing.

        The filter drops two kinds of output of the wall-clock walk. Started
        inside the second occurrence of a repeated wall time, the walk can
        yield that time's first occurrence, which lies before `after`. And
        several skipped wall times of one spring-forward gap yield the same
        instant.
        """
        start = _require_aware(after).astimezone(UTC)
        if self.fixed_time:
            source = self._wall_clock_fire_times(start)
        else:
            source = self._real_time_fire_times(start)
        last = start
        for utc in source:
            if utc > last:
                last = utc
                yield utc

    def _wall_clock_fire_times(self, start: datetime) -> Iterator[datetime]:
        # For fixed-time expressions cronsim walks naive wall-clock time and
        # applies cronie's rules itself. It picks the first occurrence of a
        # repeated wall time (fold=0) and moves a skipped one forward to the
        # end of the gap.
        iterator = CronSim(self.cron, start.astimezone(self.zone))
        while True:
            try:
                moment = next(iterator)
            except StopIteration:
                return
            yield moment.astimezone(UTC)

    def _real_time_fire_times(self, start: datetime) -> Iterator[datetime]:
        """Yield every instant after start whose wall-clock time matches.

        Walks one stretch of constant UTC offset at a time, with cronsim on
        naive wall-clock time inside it. cronsim 2.9's own walk for these
        expressions steps whole hours in UTC, which skips matches in zones
        whose offset changes by less than an hour (Australia/Lord_Howe) or
        is not whole hours (Pacific/Chatham).
        """
        while True:
            offset = self._offset(start + _TINY)
            walls = CronSim(self.cron, (start + offset).replace(tzinfo=None))
            for wall in walls:
                utc = (wall - offset).replace(tzinfo=UTC)
                change = self._offset_change(start, utc, offset)
                if change is not None:
                    # Restart in the next stretch, from its first instant.
                    start = change - _TINY
                    break
                yield utc
                start = utc
            else:
                return

    def _offset(self, moment: datetime) -> timedelta:
        offset = moment.astimezone(self.zone).utcoffset()
        assert offset is not None
        return offset

    def _offset_change(self, start: datetime, end: datetime,
                       offset: timedelta) -> datetime | None:
        """Return the first instant in (start, end] whose UTC offset is not offset, or None.

        It probes every SCAN_STEP, so two changes that cancel out within one
        step would go unnoticed.
        """
        probe = start
        while probe < end:
            step_end = min(probe + SCAN_STEP, end)
            if self._offset(step_end) != offset:
                return self._first_change(probe, step_end, offset)
            probe = step_end
        return None

    def _first_change(self, low: datetime, high: datetime, offset: timedelta) -> datetime:
        # Bisect on whole seconds, the resolution of tz data transitions.
        before = math.floor(low.timestamp())
        after = math.ceil(high.timestamp())
        while after - before > 1:
            middle = (before + after) // 2
            if self._offset(datetime.fromtimestamp(middle, UTC)) != offset:
                after = middle
            else:
                before = middle
        return datetime.fromtimestamp(after, UTC)


def _require_aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone. Pass a timezone-aware "
                         "datetime.")
    return moment


def schedule_setting(job: str) -> str:
    """Return the environment variable that contains job's cron expression."""
    return ENV_NAMES[f"{job.replace('-', '_')}_schedule"]


def job_schedule(job: str, settings: Settings) -> Schedule:
    """Return job's validated schedule, or raise ScheduleError naming the setting."""
    expression = getattr(settings, f"{job.replace('-', '_')}_schedule")
    return Schedule(expression, settings.schedule_timezone, setting=schedule_setting(job))


def job_enabled(job: str, settings: Settings) -> bool:
    return bool(getattr(settings, f"{job.replace('-', '_')}_enabled"))
