// PM2 process file: one long-running `voucher-jobs scheduler` process.
//
//   pm2 start deploy/pm2/ecosystem.config.js
//   pm2 save       # the process list for `pm2 resurrect` and `pm2 startup`
//
// The scheduler starts both jobs at their cron fire times
// (VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE and VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE,
// in VOUCHER_JOBS_SCHEDULE_TIMEZONE), runs one catch-up after downtime, and
// records every run in the ledger. Overlap needs no PM2 setting: the job
// lock lets one run of a job work at a time, and the run key lets each fire
// time run once, also with a second scheduler on another host. A run that
// is refused is recorded as `skipped` and logged as `fire_time_skipped`;
// the scheduler process keeps running.
//
// Settings come from the .env file in `cwd` (DATABASE_URL and the
// schedules, mode 0600) and from `env` below. Variables in the environment
// of the shell that runs `pm2 start` reach the process too. Two variables of this file's own move it to other paths:
// VOUCHER_JOBS_HOME (working directory, default /var/lib/voucher-jobs) and
// VOUCHER_JOBS_BIN (the command, default /opt/voucher-jobs/bin/voucher-jobs).
//
// deploy/pm2/ecosystem.cron-restart.config.js runs each job as a one-shot
// process started by PM2's cron_restart instead. Use one file or the other,
// not both.

const home = process.env.VOUCHER_JOBS_HOME || "/var/lib/voucher-jobs";
const bin = process.env.VOUCHER_JOBS_BIN || "/opt/voucher-jobs/bin/voucher-jobs";

module.exports = {
  apps: [
    {
      name: "voucher-jobs-scheduler",
      script: bin,
      args: ["scheduler"],
      // A console script with a shebang line, started as it is, not by node.
      interpreter: "none",
      cwd: home,
      // One process is enough. More instances, here or on other hosts, are
      // safe but only add fire_time_skipped lines.
      instances: 1,
      exec_mode: "fork",
      autorestart: true,
      // PM2 stops a process with SIGINT. voucher-jobs then lets the active
      // run finish its current batch, records it as interrupted and exits
      // with 0. PM2's default of 1.6 s before SIGKILL is too short for a
      // batch, so wait up to 60 s.
      kill_timeout: 60000,
      // An invalid setting (exit code 2) or a database that is unreachable
      // or not migrated (exit code 4) ends the process at start. Restart
      // with growing delays instead of in a tight loop.
      exp_backoff_restart_delay: 1000,
      // Values set here take precedence over the .env file. The schedules
      // default to 0 2 * * * and 0 3 * * * in UTC. Set them in .env or here:
      //   VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE: "0 2 * * *",
      env: {},
      // voucher-jobs writes its own UTC timestamps on every line. Without
      // merge_logs PM2 adds the instance number to the file names.
      merge_logs: true,
      out_file: `${home}/logs/scheduler.out.log`,
      error_file: `${home}/logs/scheduler.err.log`,
    },
  ],
};
