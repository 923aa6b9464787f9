"""`python -m voucher_jobs` runs the voucher-jobs command."""

from voucher_jobs.cli.main import main

main()
