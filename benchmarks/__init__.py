"""The benchmark suite of voucher-jobs: `python3 dev.py bench --help`."""
