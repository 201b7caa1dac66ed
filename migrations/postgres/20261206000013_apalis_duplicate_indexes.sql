-- apalis's schema indexes two columns twice: `id` (its primary key `jobs_pkey` and the unique
-- index `unique_job_id`) and `lock_by` (`lidx` and `idx_apalis_jobs_lock_by`). Every fetch and
-- every ack changes a job's status (a column of the fetch index's predicate), so PostgreSQL
-- cannot update the row in place and inserts a new entry into each index: the copies cost two
-- index inserts per job, twice per delivery, and serve no query the originals do not.
DROP INDEX IF EXISTS apalis.unique_job_id;
DROP INDEX IF EXISTS apalis.lidx;
