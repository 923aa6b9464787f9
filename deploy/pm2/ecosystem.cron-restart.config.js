// PM2 process file, one-shot variant: each job is a process that runs once
// and exits, and PM2's cron_restart starts it again at the cron times.
//
//   pm2 start deploy/pm2/ecosystem.cron-restart.config.js
//
// Prefer deploy/pm2/ecosystem.config.js, the long-running scheduler: it
// catches up after downtime, uses the product's own schedule settings and
// records each fire time under a run key. This variant suits a host where
// PM2 already runs other one-shot tasks.
//
// `pm2 start` runs each job once at once, and cron_restart then starts it
// at every fire time, in the time zone of the PM2 daemon. With autorestart
// off, an exit is final until the next fire time, whatever its code. A run
// that finds the job already running exits with code 3 and is recorded as
// `skipped` in the ledger. PM2 then lists the process as stopped, the same
// as after a run that succeeded. Failed runs (exit code 1) show in the
// ledger (`voucher-jobs runs --status failed`) and in the error log.
//
// Settings and the two path variables are those of ecosystem.config.js.

const home = process.env.VOUCHER_JOBS_HOME || "/var/lib/voucher-jobs";
const bin = process.env.VOUCHER_JOBS_BIN || "/opt/voucher-jobs/bin/voucher-jobs";

function oneShot(job, cronTime) {
  return {
    name: `voucher-jobs-${job}`,
    script: bin,
    args: ["run", job],
    interpreter: "none",
    cwd: home,
    exec_mode: "fork",
    instances: 1,
    cron_restart: cronTime,
    autorestart: false,
    kill_timeout: 60000,
    merge_logs: true,
    out_file: `${home}/logs/${job}.out.log`,
    error_file: `${home}/logs/${job}.err.log`,
  };
}

module.exports = {
  apps: [
    oneShot("voucher-expired", process.env.VOUCHER_JOBS_VOUCHER_EXPIRED_CRON || "0 2 * * *"),
    oneShot("audit-archival", process.env.VOUCHER_JOBS_AUDIT_ARCHIVAL_CRON || "0 3 * * *"),
  ],
};
