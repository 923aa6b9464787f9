"""Fault-injection suites for voucher-jobs: kills, database faults, full disks.

`python -m reliability.kill_suite --help` runs them and prints the figures
that docs/reliability.md publishes. The tests in tests/test_reliability.py
and tests/test_db_faults.py run fast subsets.
"""
