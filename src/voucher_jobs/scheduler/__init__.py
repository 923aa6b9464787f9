"""Cron schedules and the scheduler that runs the jobs at their fire times."""

from voucher_jobs.scheduler.cron import FireTime, Schedule, ScheduleError
from voucher_jobs.scheduler.scheduler import Scheduler, scheduler_lifespan

__all__ = ["FireTime", "Schedule", "ScheduleError", "Scheduler", "scheduler_lifespan"]
