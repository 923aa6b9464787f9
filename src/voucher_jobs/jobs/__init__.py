"""The jobs, each a plain function of (engine, parameters, context).

Jobs know nothing of what started them; the runner gives them a run id, a
stop flag and a progress callback through JobContext.
"""

from voucher_jobs.jobs import audit_archival, voucher_expired

JOBS = {
    voucher_expired.NAME: voucher_expired.run,
    audit_archival.NAME: audit_archival.run,
}
