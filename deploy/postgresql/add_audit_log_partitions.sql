-- Create the monthly partitions of voucher_audit_logs for the current month
-- and the next months, where they are missing. Run it once a month or more
-- often, for example from cron, so that the partition of a month exists
-- before its first row:
--
--   PGOPTIONS='-c search_path=public' psql "$URL" -X -v ON_ERROR_STOP=1 \
--       -v months_ahead=3 -f deploy/postgresql/add_audit_log_partitions.sql
--
-- Partitions are named voucher_audit_logs_pYYYY_MM and cover one calendar
-- month in UTC, as deploy/postgresql/partition_audit_logs.sql creates them.
-- A month that another partition already covers is skipped with a notice.
-- Creating a partition fails when the DEFAULT partition contains rows of
-- that month. docs/partitioning.md shows how to move them.

\set ON_ERROR_STOP on
\if :{?months_ahead}
\else
\set months_ahead 3
\endif

SET timezone = 'UTC';
-- Creating a partition locks the partitioned table and the DEFAULT
-- partition, and the application's queries queue behind that wait. So wait
-- at most this long.
SET lock_timeout = '5s';

CREATE PROCEDURE pg_temp.add_partitions(months_ahead integer)
LANGUAGE plpgsql AS $$
DECLARE
    month timestamptz;
    partition_name text;
BEGIN
    FOR offset_months IN 0..months_ahead LOOP
        month := date_trunc('month', now()) + make_interval(months => offset_months);
        partition_name := 'voucher_audit_logs_p' || to_char(month, 'YYYY_MM');
        CONTINUE WHEN to_regclass(quote_ident(partition_name)) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF voucher_audit_logs FOR VALUES FROM (%L) TO (%L)',
                partition_name, month, month + interval '1 month');
            RAISE NOTICE 'created partition %', partition_name;
        EXCEPTION WHEN invalid_object_definition THEN
            -- SQLSTATE 42P17: another partition overlaps this month.
            RAISE NOTICE 'skipped %: %', partition_name, SQLERRM;
        END;
    END LOOP;
END
$$;

CALL pg_temp.add_partitions(:months_ahead);
