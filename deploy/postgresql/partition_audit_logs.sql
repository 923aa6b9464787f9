-- Convert a plain voucher_audit_logs table into one partitioned by month of created_at.
--
-- Run it with psql, as the owner of the table, with the table's schema first
-- in the search_path:
--
--   PGOPTIONS='-c search_path=public' psql "$URL" -X -v ON_ERROR_STOP=1 \
--       -f deploy/postgresql/partition_audit_logs.sql
--
-- Variables, set with psql -v NAME=VALUE:
--   months_ahead  empty monthly partitions to create after the current month (default 3)
--   batch_rows    rows per copy transaction (default 10000)
--   swap          on: swap the tables once the copy is done; off: copy only (default on)
--
-- Steps, explained in docs/partitioning.md:
--   1. Take audit-archival's job lock, so that no run deletes rows meanwhile.
--   2. Create voucher_audit_logs_partitioned: the same columns, primary key
--      (id, created_at), one partition per month from the oldest row to
--      months_ahead months after the current one, and a DEFAULT partition.
--   3. Copy the rows in id order, batch_rows per transaction, while the
--      application goes on writing to the old table.
--   4. In one transaction: block writes to the old table, copy the rows
--      written since step 3, check that both tables hold the same number of
--      rows, and swap the names. The old table stays as
--      voucher_audit_logs_unpartitioned until you drop it.
--
-- A rerun resumes the copy. Once voucher_audit_logs is partitioned, a rerun
-- changes nothing.

\set ON_ERROR_STOP on
\if :{?months_ahead}
\else
\set months_ahead 3
\endif
\if :{?batch_rows}
\else
\set batch_rows 10000
\endif
\if :{?swap}
\else
\set swap on
\endif

-- Month boundaries are computed and rendered in UTC.
SET timezone = 'UTC';
SET client_min_messages = notice;

SELECT EXISTS (
    SELECT FROM pg_class WHERE oid = to_regclass('voucher_audit_logs') AND relkind = 'p'
) AS already_partitioned \gset
\if :already_partitioned
\echo voucher_audit_logs is partitioned already; nothing to do.
\quit
\endif

-- 1. The job lock of audit-archival: a session-level advisory lock whose key
--    is the first 8 bytes of SHA-256("voucher_jobs:<schema>:audit-archival"),
--    as voucher_jobs.data.locks computes it. The lock lasts until psql exits.
DO $$
DECLARE
    table_schema name;
BEGIN
    SELECT n.nspname INTO table_schema
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('voucher_audit_logs');
    IF table_schema IS NULL THEN
        RAISE EXCEPTION 'table voucher_audit_logs was not found in the search_path %',
            current_setting('search_path')
            USING HINT = 'Set PGOPTIONS=''-c search_path=SCHEMA'' to the schema of the table.';
    END IF;
    IF table_schema <> current_schema() THEN
        RAISE EXCEPTION 'voucher_audit_logs is in schema %, but new tables would go to %',
            table_schema, current_schema()
            USING HINT = format('Put %s first in the search_path.', table_schema);
    END IF;
    IF EXISTS (SELECT FROM pg_constraint WHERE confrelid = 'voucher_audit_logs'::regclass) THEN
        RAISE EXCEPTION 'foreign keys of other tables reference voucher_audit_logs'
            USING HINT = 'They would keep referencing the old table. Drop them first; '
                         'a foreign key to a partitioned table must name (id, created_at).';
    END IF;
    IF NOT pg_try_advisory_lock(
        ('x' || left(encode(sha256(convert_to(
            'voucher_jobs:' || current_schema() || ':audit-archival', 'UTF8')), 'hex'), 16)
        )::bit(64)::bigint
    ) THEN
        RAISE EXCEPTION 'audit-archival is running on this schema'
            USING HINT = 'Wait until it ends (voucher-jobs runs), then run this script again.';
    END IF;
END
$$;

-- 2. The partitioned table, its indexes and its partitions.
CREATE PROCEDURE pg_temp.create_partitioned_table(months_ahead integer)
LANGUAGE plpgsql AS $$
DECLARE
    month timestamptz;
    last_month timestamptz;
BEGIN
    IF to_regclass('voucher_audit_logs_partitioned') IS NOT NULL THEN
        RAISE NOTICE 'voucher_audit_logs_partitioned exists; resuming the copy';
        RETURN;
    END IF;
    -- LIKE copies the columns, their defaults (the id sequence among them),
    -- identity, NOT NULL and CHECK constraints, but no index or foreign key.
    CREATE TABLE voucher_audit_logs_partitioned (
        LIKE voucher_audit_logs
        INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS
        INCLUDING STORAGE INCLUDING COMMENTS
    ) PARTITION BY RANGE (created_at);
    -- A unique constraint of a partitioned table must contain the partition
    -- key, so the primary key becomes (id, created_at).
    ALTER TABLE voucher_audit_logs_partitioned
        ADD CONSTRAINT pk_voucher_audit_logs_partitioned PRIMARY KEY (id, created_at);
    -- The indexes audit-archival and voucher-expired use, under names that
    -- the swap changes to those `voucher-jobs db upgrade` expects.
    CREATE INDEX ix_voucher_audit_logs_partitioned_created_at_id
        ON voucher_audit_logs_partitioned (created_at, id);
    CREATE INDEX ix_voucher_audit_logs_partitioned_voucher_id
        ON voucher_audit_logs_partitioned (voucher_id);

    month := date_trunc('month', coalesce((SELECT min(created_at) FROM voucher_audit_logs), now()));
    last_month := date_trunc('month', now()) + make_interval(months => months_ahead);
    WHILE month <= last_month LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF voucher_audit_logs_partitioned FOR VALUES FROM (%L) TO (%L)',
            'voucher_audit_logs_p' || to_char(month, 'YYYY_MM'), month, month + interval '1 month');
        month := month + interval '1 month';
    END LOOP;
    -- Rows outside every monthly range, such as rows dated after the last
    -- month, go here. audit-archival never drops this partition.
    CREATE TABLE voucher_audit_logs_default PARTITION OF voucher_audit_logs_partitioned DEFAULT;
END
$$;

-- 3. The copy, in passes. A pass copies the rows up to the highest id
--    committed when it started. Before it reads, it waits until every
--    transaction that was open at its start has ended. Such a transaction
--    may have taken a lower id that it has not committed yet, and the copy
--    must not pass that id before the row is visible. The swap copies what
--    the last pass left.
CREATE PROCEDURE pg_temp.copy_rows(batch_rows integer)
LANGUAGE plpgsql AS $$
DECLARE
    copied_up_to bigint;
    pass_end bigint;
    open_transactions xid8[];
    waited_seconds numeric;
    batch_last bigint;
    batch_count bigint;
    pass_count bigint;
BEGIN
    LOOP
        SELECT coalesce(max(id), 0) INTO copied_up_to FROM voucher_audit_logs_partitioned;
        SELECT max(id) INTO pass_end FROM voucher_audit_logs;
        EXIT WHEN pass_end IS NULL OR pass_end <= copied_up_to;
        open_transactions := ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot()));
        COMMIT;
        waited_seconds := 0;
        WHILE EXISTS (SELECT FROM unnest(open_transactions) AS open_transaction
                      WHERE pg_xact_status(open_transaction) = 'in progress') LOOP
            IF waited_seconds >= 300 THEN
                RAISE EXCEPTION 'transactions % are still open after 300 s', open_transactions
                    USING HINT = 'Find them in pg_stat_activity (backend_xid), end them, '
                                 'and run the script again; it resumes the copy.';
            END IF;
            PERFORM pg_sleep(0.1);
            waited_seconds := waited_seconds + 0.1;
        END LOOP;

        pass_count := 0;
        LOOP
            WITH copied AS (
                INSERT INTO voucher_audit_logs_partitioned
                SELECT * FROM voucher_audit_logs
                WHERE id > copied_up_to AND id <= pass_end
                ORDER BY id
                LIMIT batch_rows
                RETURNING id
            )
            SELECT max(id), count(*) INTO batch_last, batch_count FROM copied;
            EXIT WHEN batch_count = 0;
            copied_up_to := batch_last;
            pass_count := pass_count + batch_count;
            COMMIT;
        END LOOP;
        RAISE NOTICE 'copied % rows, up to id %', pass_count, copied_up_to;
        -- Fewer new rows than one batch: the swap copies the rest.
        EXIT WHEN pass_count < batch_rows;
    END LOOP;
END
$$;

-- 4. The swap, in one transaction.
CREATE PROCEDURE pg_temp.swap_tables()
LANGUAGE plpgsql AS $$
DECLARE
    old_rows bigint;
    new_rows bigint;
    added bigint;
    index_name name;
    old_sequence text;
    new_sequence text;
    identity_kind "char";
    grant_entry record;
    leftover text;
BEGIN
    -- EXCLUSIVE waits for the writers that are in progress, then blocks new
    -- writes; reads go on until the renames below.
    LOCK TABLE voucher_audit_logs IN EXCLUSIVE MODE;
    INSERT INTO voucher_audit_logs_partitioned
    SELECT * FROM voucher_audit_logs
    WHERE id > (SELECT coalesce(max(id), 0) FROM voucher_audit_logs_partitioned);
    SELECT count(*) INTO old_rows FROM voucher_audit_logs;
    SELECT count(*) INTO new_rows FROM voucher_audit_logs_partitioned;
    IF new_rows < old_rows THEN
        -- A row committed after the copy had passed its id: an id taken from
        -- a sequence cache, or given by the application.
        INSERT INTO voucher_audit_logs_partitioned
        SELECT * FROM voucher_audit_logs AS old
        WHERE NOT EXISTS (SELECT FROM voucher_audit_logs_partitioned AS copy
                          WHERE copy.id = old.id AND copy.created_at = old.created_at);
        GET DIAGNOSTICS added = ROW_COUNT;
        RAISE NOTICE 'copied % rows that the passes had missed', added;
        new_rows := new_rows + added;
    END IF;
    IF new_rows <> old_rows THEN
        RAISE EXCEPTION 'voucher_audit_logs has % rows, its partitioned copy %', old_rows, new_rows
            USING HINT = 'Rows were deleted or changed after they were copied. Nothing was '
                         'swapped. Stop what deletes audit rows, drop '
                         'voucher_audit_logs_partitioned, and run the script again.';
    END IF;

    -- Free the names of the old table's indexes and primary key.
    FOR index_name IN
        SELECT c.relname FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid
        WHERE x.indrelid = 'voucher_audit_logs'::regclass
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', index_name,
                       left(index_name, 48) || '_unpartitioned');
    END LOOP;
    ALTER TABLE voucher_audit_logs RENAME TO voucher_audit_logs_unpartitioned;
    ALTER TABLE voucher_audit_logs_partitioned RENAME TO voucher_audit_logs;
    FOR index_name IN
        SELECT c.relname FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid
        WHERE x.indrelid = 'voucher_audit_logs'::regclass
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', index_name,
                       replace(index_name, 'voucher_audit_logs_partitioned', 'voucher_audit_logs'));
    END LOOP;

    -- The id sequence. A serial column's sequence moves to the new table, so
    -- that dropping the old table later keeps it. An identity column got a
    -- sequence of its own from LIKE, which goes on after the old one.
    SELECT attidentity INTO identity_kind FROM pg_attribute
    WHERE attrelid = 'voucher_audit_logs_unpartitioned'::regclass AND attname = 'id';
    old_sequence := pg_get_serial_sequence('voucher_audit_logs_unpartitioned', 'id');
    IF identity_kind IN ('a', 'd') THEN
        new_sequence := pg_get_serial_sequence('voucher_audit_logs', 'id');
        EXECUTE format('SELECT setval(%L, last_value, is_called) FROM %s',
                       new_sequence, old_sequence);
    ELSIF old_sequence IS NOT NULL THEN
        EXECUTE format('ALTER SEQUENCE %s OWNED BY voucher_audit_logs.id', old_sequence);
    END IF;

    -- The privileges of the old table, for the application's roles.
    FOR grant_entry IN
        SELECT privilege_type, is_grantable,
               CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END
                   AS grantee_name
        FROM aclexplode((SELECT relacl FROM pg_class
                         WHERE oid = 'voucher_audit_logs_unpartitioned'::regclass))
        WHERE grantee <> (SELECT relowner FROM pg_class
                          WHERE oid = 'voucher_audit_logs_unpartitioned'::regclass)
    LOOP
        EXECUTE format('GRANT %s ON voucher_audit_logs TO %s%s', grant_entry.privilege_type,
                       grant_entry.grantee_name,
                       CASE WHEN grant_entry.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;

    -- What the new table does not have: recreate these yourself.
    FOR leftover IN
        SELECT 'index ' || pg_get_indexdef(x.indexrelid)
        FROM pg_index AS x
        WHERE x.indrelid = 'voucher_audit_logs_unpartitioned'::regclass
          AND NOT x.indisprimary
          AND pg_get_indexdef(x.indexrelid) !~ '\((created_at, id|voucher_id)\)$'
        UNION ALL
        SELECT 'trigger ' || tgname FROM pg_trigger
        WHERE tgrelid = 'voucher_audit_logs_unpartitioned'::regclass AND NOT tgisinternal
        UNION ALL
        SELECT 'foreign key ' || conname FROM pg_constraint
        WHERE conrelid = 'voucher_audit_logs_unpartitioned'::regclass AND contype = 'f'
        UNION ALL
        SELECT 'row security policy ' || polname FROM pg_policy
        WHERE polrelid = 'voucher_audit_logs_unpartitioned'::regclass
    LOOP
        RAISE WARNING 'voucher_audit_logs_unpartitioned has a % that the partitioned table lacks',
            leftover;
    END LOOP;
    RAISE NOTICE 'voucher_audit_logs is partitioned now, with % rows', new_rows;
END
$$;

CALL pg_temp.create_partitioned_table(:months_ahead);
CALL pg_temp.copy_rows(:batch_rows);
\if :swap
SET lock_timeout = '5s';
CALL pg_temp.swap_tables();
\else
\echo The copy is done; run the script again with -v swap=on to swap the tables.
\endif
