"""Cron schedules: validation, cronie semantics, croniter as a reference, DST rules."""

from __future__ import annotations

import random
import time
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from voucher_jobs.config import ConfigError, Settings, load_settings
from voucher_jobs.scheduler.cron import MACROS, Schedule, ScheduleError, job_schedule

UTC = timezone.utc
MINUTE = timedelta(minutes=1)
SETTING = "VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def fire_times_utc(expression: str, zone: str, after: datetime, count: int) -> list[datetime]:
    return [fire.utc for fire in Schedule(expression, zone).next_fire_times(after, count)]


# Validation

INVALID = [
    ("*/0 * * * *", "minute", "a step of 0"),
    ("60 * * * *", "minute", "contains 60, outside the range 0-59"),
    ("0 24 * * *", "hour", "contains 24, outside the range 0-23"),
    ("0 0 32 * *", "day-of-month", "contains 32, outside the range 1-31"),
    ("* * * 13 *", "month", "contains 13, outside the range 1-12"),
    ("* * * * 8", "day-of-week", "contains 8, outside the range 0-7"),
    ("* * * *", None, "it has 4 fields"),
    ("0 * * * * *", None, "it has 6 fields"),
    ("0 2 31 2 *", "day-of-month", "never fires"),
    ("0 0 31 4,6,9,11 *", "day-of-month", "never fires"),
    ("5-1 * * * *", "minute", "whose start is after its end"),
    ("0 0 L * *", "day-of-month", "Quartz"),
    ("0 0 * * 5#2", "day-of-week", "Quartz"),
    ("0 0 ? * *", "day-of-month", "Quartz"),
    ("~ * * * *", "minute", "random value"),
    ("0 0 * * MONDAY", "day-of-week", "three-letter name"),
    ("0 0 * FOO *", "month", "three-letter name"),
    ("0 0 1,,2 * *", "day-of-month", "empty list item"),
    ("*/x * * * *", "minute", "not a whole number"),
    ("0 -3 * * *", "hour", "missing number"),
    ("@reboot", None, "@reboot has no fire times"),
    ("@fortnightly", None, "not a known macro"),
    ("", None, "it is empty"),
]


@pytest.mark.parametrize(("expression", "field", "detail"), INVALID)
def test_invalid_expression_names_field(expression: str, field: str | None,
                                        detail: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ScheduleError) as caught:
        Schedule(expression, "UTC", setting=SETTING)
    elapsed = time.perf_counter() - started

    message = str(caught.value)
    assert caught.value.field == field
    assert message.startswith(f"{SETTING}={expression!r} is invalid: ")
    if field is not None:
        assert f"the {field} field" in message
    assert detail in message
    assert elapsed < 1.0


def test_schedule_error_is_config_error() -> None:
    # The CLI maps ConfigError to exit code 2.
    assert issubclass(ScheduleError, ConfigError)


def test_job_schedule_names_its_setting() -> None:
    expired = Settings(_env_file=None, voucher_expired_schedule="0 24 * * *")
    archival = Settings(_env_file=None, audit_archival_schedule="0 0 * * 8")

    with pytest.raises(ScheduleError) as expired_error:
        job_schedule("voucher-expired", expired)
    with pytest.raises(ScheduleError) as archival_error:
        job_schedule("audit-archival", archival)

    assert str(expired_error.value).startswith(
        "VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE='0 24 * * *' is invalid: the hour field")
    assert str(archival_error.value).startswith(
        "VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE='0 0 * * 8' is invalid: the day-of-week field")


def test_invalid_zone_names_timezone_setting() -> None:
    with pytest.raises(ScheduleError) as caught:
        Schedule("0 2 * * *", "Mars/Base")
    with pytest.raises(ConfigError) as from_settings:
        load_settings(_env_file=None, schedule_timezone="Mars/Base")

    assert str(caught.value).startswith(
        "VOUCHER_JOBS_SCHEDULE_TIMEZONE='Mars/Base' is invalid")
    assert "VOUCHER_JOBS_SCHEDULE_TIMEZONE='Mars/Base'" in str(from_settings.value)


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        Schedule("0 2 * * *").next_fire_times(datetime(2026, 1, 1), 1)


# cronie semantics

@pytest.mark.parametrize("macro", sorted(MACROS))
def test_macro_matches_five_fields(macro: str) -> None:
    after = utc(2026, 12, 4, 10, 17)
    assert (fire_times_utc(macro, "UTC", after, 5)
            == fire_times_utc(MACROS[macro], "UTC", after, 5))


def test_macro_first_fire_times() -> None:
    after = utc(2026, 12, 4, 10, 17)  # a Friday
    assert fire_times_utc("@hourly", "UTC", after, 1) == [utc(2026, 12, 4, 11)]
    assert fire_times_utc("@daily", "UTC", after, 1) == [utc(2026, 12, 5)]
    assert fire_times_utc("@weekly", "UTC", after, 1) == [utc(2026, 12, 6)]
    assert fire_times_utc("@monthly", "UTC", after, 1) == [utc(2027, 1, 1)]
    assert fire_times_utc("@yearly", "UTC", after, 1) == [utc(2027, 1, 1)]


def test_sunday_is_zero_and_seven() -> None:
    after = utc(2026, 12, 1)
    sundays = fire_times_utc("0 0 * * 0", "UTC", after, 4)

    assert fire_times_utc("0 0 * * 7", "UTC", after, 4) == sundays
    assert fire_times_utc("0 0 * * sun", "UTC", after, 4) == sundays
    assert [moment.isoweekday() for moment in sundays] == [7, 7, 7, 7]


def test_weekday_range_ending_sunday() -> None:
    # cronie reads a range that ends on 0 or SUN as ending on 7.
    after = utc(2026, 12, 1)
    weekend = fire_times_utc("0 0 * * 5-7", "UTC", after, 6)

    assert fire_times_utc("0 0 * * FRI-SUN", "UTC", after, 6) == weekend
    assert fire_times_utc("0 0 * * 5-0", "UTC", after, 6) == weekend
    assert [moment.isoweekday() for moment in weekend] == [5, 6, 7, 5, 6, 7]


def test_names_ignore_case() -> None:
    after = utc(2026, 12, 1)
    assert (fire_times_utc("0 0 * jan-mar Mon-Fri", "UTC", after, 10)
            == fire_times_utc("0 0 * 1-3 1-5", "UTC", after, 10))


def test_day_fields_or_when_restricted() -> None:
    # Neither day field starts with '*': a day matches either field.
    fires = fire_times_utc("0 0 1,15 * 1", "UTC", utc(2026, 5, 31), 8)
    days = [(moment.day, moment.isoweekday()) for moment in fires]
    assert days == [(1, 1), (8, 1), (15, 1), (22, 1), (29, 1), (1, 3), (6, 1), (13, 1)]


def test_day_fields_and_with_star() -> None:
    # The day-of-month field starts with '*', so a day must match both:
    # odd days that are Mondays.
    fires = fire_times_utc("0 0 */2 * 1", "UTC", utc(2026, 5, 31), 4)
    assert fires == [utc(2026, 6, 1), utc(2026, 6, 15), utc(2026, 6, 29), utc(2026, 7, 13)]


def test_steps_ranges_and_lists() -> None:
    after = utc(2026, 12, 4, 9, 59)
    hour = [moment.minute for moment in fire_times_utc("5/20 10 * * *", "UTC", after, 3)]
    assert hour == [5, 25, 45]
    assert [moment.minute for moment in fire_times_utc("1-10/3,30 10 * * *", "UTC", after, 5)
            ] == [1, 4, 7, 10, 30]
    assert [moment.hour for moment in fire_times_utc("0 */8 * * *", "UTC", after, 3)
            ] == [16, 0, 8]


def test_fixed_time_follows_cronie_stars() -> None:
    assert Schedule("0 2 * * *").fixed_time
    assert Schedule("@daily").fixed_time
    assert Schedule("0,30 1-3 * * *").fixed_time
    assert not Schedule("*/15 * * * *").fixed_time
    assert not Schedule("0 * * * *").fixed_time
    assert not Schedule("@hourly").fixed_time
    assert not Schedule("*/15 2 * * *").fixed_time


# croniter as a reference in UTC

MONTH_NAMES = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
DAY_NAMES = "SUN MON TUE WED THU FRI SAT".split()


def _value(rng: random.Random, low: int, high: int, names: list[str] | None) -> tuple[str, int]:
    number = rng.randint(low, high)
    # SUN is 0, so 7 stays a number.
    if names and number < 7 and rng.random() < 0.3:
        return names[number - low], number
    return str(number), number


def _item(rng: random.Random, low: int, high: int, names: list[str] | None) -> str:
    first_text, first = _value(rng, low, high, names)
    last_text, last = _value(rng, low, high, names)
    if first == last or rng.random() < 0.3:
        return first_text
    if first > last:
        first_text, last_text, first, last = last_text, first_text, last, first
    if rng.random() < 0.5:
        return f"{first_text}-{last_text}"
    return f"{first_text}-{last_text}/{rng.randint(1, last - first)}"


def _random_field(rng: random.Random, low: int, high: int,
                  names: list[str] | None = None) -> str:
    roll = rng.random()
    if roll < 0.3:
        return "*"
    if roll < 0.45:
        return f"*/{rng.randint(1, high - low)}"
    return ",".join(_item(rng, low, high, names) for _ in range(rng.choice([1, 1, 2, 3])))


def random_expression(rng: random.Random) -> str:
    """Return a random expression in the forms that croniter reads as cronie does.

    Left out, and tested above instead: a lone start with a step (5/15),
    '*' inside a list, and a day-of-week range ending on Sunday as 0 or SUN.
    croniter 7 reads those differently.
    """
    return " ".join([
        _random_field(rng, 0, 59),
        _random_field(rng, 0, 23),
        _random_field(rng, 1, 31),
        _random_field(rng, 1, 12, MONTH_NAMES),
        _random_field(rng, 0, 7, DAY_NAMES),
    ])


def test_matches_croniter_in_utc() -> None:
    rng = random.Random(20261204)
    compared = 0
    for _ in range(400):
        expression = random_expression(rng)
        try:
            schedule = Schedule(expression, "UTC")
        except ScheduleError as exc:
            assert "never fires" in str(exc), expression
            continue
        start = utc(2026, 1, 1) + timedelta(seconds=rng.randint(0, 5 * 365 * 86400))
        fields = expression.split()
        # cronie's rule, which croniter applies when day_or is False.
        day_or = not (fields[2].startswith("*") or fields[4].startswith("*"))
        reference = croniter(expression, start, day_or=day_or)
        expected = [reference.get_next(datetime) for _ in range(12)]

        actual = [fire.utc for fire in schedule.next_fire_times(start, 12)]

        assert actual == expected, f"{expression} after {start.isoformat()}"
        compared += 1
    assert compared > 350


# Daylight saving time in 2026: Europe/Berlin changes on 29 March (02:00 to
# 03:00) and 25 October (03:00 back to 02:00). America/New_York changes on
# 8 March (02:00 to 03:00) and 1 November (02:00 back to 01:00).

def test_berlin_spring_forward_0230() -> None:
    schedule = Schedule("30 2 * * *", "Europe/Berlin")
    fires = schedule.next_fire_times(utc(2026, 3, 28, 12), 3)

    # 02:30 does not exist on 29 March, so the job runs once when the gap ends.
    assert [fire.utc for fire in fires] == [
        utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]
    assert fires[0].local.isoformat() == "2026-03-29T03:00:00+02:00"
    assert [fire.dst_change_day for fire in fires] == [True, False, False]


def test_berlin_fall_back_0230_runs_once() -> None:
    schedule = Schedule("30 2 * * *", "Europe/Berlin")
    fires = schedule.next_fire_times(utc(2026, 10, 24, 12), 3)

    # 02:30 occurs twice on 25 October, and the job runs at the first one (CEST).
    assert [fire.utc for fire in fires] == [
        utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    assert fires[0].local.isoformat() == "2026-10-25T02:30:00+02:00"
    assert [fire.dst_change_day for fire in fires] == [True, False, False]


def test_berlin_fall_back_from_second_pass() -> None:
    # Looking from inside the second 02:xx hour, today's run is already past.
    schedule = Schedule("30 2 * * *", "Europe/Berlin")
    assert schedule.next_fire_time(utc(2026, 10, 25, 1, 10)).utc == utc(2026, 10, 26, 1, 30)


def test_new_york_spring_forward_0230() -> None:
    fires = Schedule("30 2 * * *", "America/New_York").next_fire_times(utc(2026, 3, 7, 12), 2)

    assert [fire.utc for fire in fires] == [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]
    assert fires[0].local.isoformat() == "2026-03-08T03:00:00-04:00"
    assert fires[0].dst_change_day


def test_new_york_fall_back_0130_runs_once() -> None:
    schedule = Schedule("30 1 * * *", "America/New_York")
    fires = schedule.next_fire_times(utc(2026, 10, 31, 12), 2)

    assert [fire.utc for fire in fires] == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    assert fires[0].local.isoformat() == "2026-11-01T01:30:00-04:00"
    assert schedule.next_fire_time(utc(2026, 11, 1, 6, 10)).utc == utc(2026, 11, 2, 6, 30)


def test_new_york_fall_back_0230_once() -> None:
    # 02:30 exists once on 1 November (after the change, EST).
    fires = Schedule("30 2 * * *", "America/New_York").next_fire_times(utc(2026, 10, 31, 12), 1)
    assert fires[0].utc == utc(2026, 11, 1, 7, 30)


@pytest.mark.parametrize(("zone", "day"), [
    ("Europe/Berlin", date(2026, 3, 29)),
    ("Europe/Berlin", date(2026, 10, 25)),
    ("America/New_York", date(2026, 3, 8)),
    ("America/New_York", date(2026, 11, 1)),
])
def test_every_15_minutes_keeps_utc_gaps(zone: str, day: date) -> None:
    schedule = Schedule("*/15 * * * *", zone)
    start = datetime.combine(day, datetime.min.time(), tzinfo=ZoneInfo(zone)) - timedelta(hours=6)
    fires = schedule.next_fire_times(start, 4 * 36)

    gaps = {later.utc - earlier.utc for earlier, later in zip(fires, fires[1:])}
    on_change_day = [fire for fire in fires if fire.local.date() == day]
    assert gaps == {timedelta(minutes=15)}
    # 23 wall-clock hours in spring, 25 in autumn.
    assert len(on_change_day) in (92, 100)
    assert all(fire.dst_change_day for fire in on_change_day)


def test_hourly_keeps_utc_gaps() -> None:
    for zone in ("Europe/Berlin", "America/New_York"):
        for after in (utc(2026, 3, 7), utc(2026, 3, 28), utc(2026, 10, 24), utc(2026, 10, 31)):
            fires = Schedule("0 * * * *", zone).next_fire_times(after, 72)
            gaps = {later.utc - earlier.utc for earlier, later in zip(fires, fires[1:])}
            assert gaps == {timedelta(hours=1)}, (zone, after)


def test_minute_step_in_fixed_hour() -> None:
    # '*/15 2 * * *' runs on real time: all 02:xx quarter hours, twice in
    # autumn and not at all on the day 02:xx is skipped.
    schedule = Schedule("*/15 2 * * *", "Europe/Berlin")
    autumn = [fire for fire in schedule.next_fire_times(utc(2026, 10, 24, 12), 12)
              if fire.local.date() == date(2026, 10, 25)]
    spring = [fire for fire in schedule.next_fire_times(utc(2026, 3, 28, 12), 12)
              if fire.local.date() == date(2026, 3, 29)]

    assert len(autumn) == 8
    assert [fire.local.utcoffset() for fire in autumn] == [timedelta(hours=2)] * 4 + [
        timedelta(hours=1)] * 4
    assert spring == []


def test_dst_change_day_flag() -> None:
    berlin = Schedule("0 12 * * *", "Europe/Berlin")
    assert berlin.dst_change_day(date(2026, 3, 29))
    assert berlin.dst_change_day(date(2026, 10, 25))
    assert not berlin.dst_change_day(date(2026, 3, 28))
    assert not berlin.dst_change_day(date(2026, 10, 26))
    assert not Schedule("0 12 * * *", "UTC").dst_change_day(date(2026, 3, 29))


# A minute-by-minute model of the policy, compared across real transitions.

def _values(text: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first, last = (int(part) for part in base.split("-"))
        else:
            first = int(base)
            last = high if slash else first
        values |= set(range(first, last + 1, int(step) if slash else 1))
    return values


def expected_fire_times(expression: str, zone: str, start: datetime,
                        end: datetime) -> list[datetime]:
    """Apply the DST policy by brute force to each UTC minute in [start, end)."""
    minute, hour, dom, month, dow = expression.split()
    minutes, hours = _values(minute, 0, 59), _values(hour, 0, 23)
    days, months = _values(dom, 1, 31), _values(month, 1, 12)
    weekdays = {value % 7 for value in _values(dow, 0, 7)}
    both_days = dom.startswith("*") or dow.startswith("*")

    def matches(wall: datetime) -> bool:
        if wall.minute not in minutes or wall.hour not in hours or wall.month not in months:
            return False
        day_matches = wall.day in days
        weekday_matches = wall.isoweekday() % 7 in weekdays
        if both_days:
            return day_matches and weekday_matches
        return day_matches or weekday_matches

    walls = []
    moment = start
    while moment < end:
        walls.append((moment, moment.astimezone(ZoneInfo(zone)).replace(tzinfo=None)))
        moment += MINUTE
    if minute.startswith("*") or hour.startswith("*"):
        return [moment for moment, wall in walls if matches(wall)]
    fires = set()
    seen = set()
    for moment, wall in walls:
        if matches(wall) and wall not in seen:
            fires.add(moment)
        seen.add(wall)
    # Wall times skipped by a spring-forward gap run when the gap ends.
    wall = walls[0][1]
    while wall <= walls[-1][1]:
        if matches(wall) and wall not in seen:
            fires.add(next(moment for moment, later in walls if later > wall))
        wall += MINUTE
    return sorted(fires)


def offset_changes(zone: str, year: int) -> list[datetime]:
    changes = []
    moment = utc(year, 1, 1)
    offset = moment.astimezone(ZoneInfo(zone)).utcoffset()
    while moment.year == year:
        moment += timedelta(minutes=15)
        current = moment.astimezone(ZoneInfo(zone)).utcoffset()
        if current != offset:
            changes.append(moment)
            offset = current
    return changes


# Lord Howe moves by 30 minutes, Santiago and Havana change at midnight, and
# Chatham's offsets are not whole hours.
MODEL_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
               "America/Santiago", "America/Havana", "Pacific/Chatham"]
MODEL_EXPRESSIONS = ["30 2 * * *", "0,30 1-3 * * *", "*/15 * * * *", "*/15 2 * * *",
                     "0 * * * *", "0 0 * * *", "30 0 * * *", "5 */2 * * *", "45 23 * * *",
                     "15 1 * * 0", "0 3 * * *"]


@pytest.mark.parametrize("zone", MODEL_ZONES)
def test_dst_policy_matches_model(zone: str) -> None:
    changes = offset_changes(zone, 2026)
    assert len(changes) == 2
    for change in changes:
        start = (change - timedelta(hours=26)).replace(minute=0)
        end = change + timedelta(hours=26)
        for expression in MODEL_EXPRESSIONS:
            schedule = Schedule(expression, zone)
            actual = []
            for fire in schedule.fire_times(start - timedelta(microseconds=1)):
                if fire.utc >= end:
                    break
                actual.append(fire.utc)

            assert actual == expected_fire_times(expression, zone, start, end), (
                zone, change.isoformat(), expression)


# Searching back and counting

def test_latest_fire_time_in_window() -> None:
    schedule = Schedule("0 2 * * *")
    now = utc(2026, 12, 4, 10)

    assert schedule.latest_fire_time(now, not_before=utc(2026, 11, 1)).utc == utc(2026, 12, 4, 2)
    assert schedule.latest_fire_time(now, not_before=utc(2026, 12, 4, 3)) is None
    assert schedule.latest_fire_time(utc(2026, 12, 4, 2), not_before=utc(2026, 12, 4, 2)
                                     ).utc == utc(2026, 12, 4, 2)


def test_latest_fire_time_years_back() -> None:
    schedule = Schedule("0 0 29 2 *", "Europe/Berlin")
    latest = schedule.latest_fire_time(utc(2031, 1, 1), not_before=utc(2020, 1, 1))
    assert latest is not None
    assert latest.local.isoformat() == "2028-02-29T00:00:00+01:00"


def test_count_fire_times_with_limit() -> None:
    schedule = Schedule("0 * * * *")
    assert schedule.count_fire_times(utc(2026, 12, 4, 5), utc(2026, 12, 4, 10), 100) == 5
    assert schedule.count_fire_times(utc(2026, 12, 4, 5), utc(2026, 12, 4, 10), 3) == 3
    assert schedule.count_fire_times(utc(2026, 12, 4, 10), utc(2026, 12, 4, 10), 100) == 0
