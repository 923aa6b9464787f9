"""voucher-jobs: the background jobs of a voucher backend."""

__version__ = "0.1.0"
