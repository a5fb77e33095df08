-- GPU utilisation per run (from the executor's telemetry, reported with the run's end) and
-- each job's outcome, for the efficiency, jobs-succeeded and success-rate leaderboards.
-- Existing usage rows get no figures: rebuild the projection from the events after upgrading
-- (`overfly-projector rebuild usage`).

ALTER TABLE read_usage_runs
    -- GPU-seconds covered by telemetry samples and GPU-seconds busy; NULL when the run's end
    -- reported no utilisation (or it has not ended).
    ADD COLUMN gpu_seconds_sampled double precision,
    ADD COLUMN gpu_seconds_busy    double precision,
    ADD COLUMN peak_memory_mb      bigint;

ALTER TABLE read_usage_jobs
    -- succeeded | failed | cancelled once the job finished; NULL while it has not.
    ADD COLUMN outcome     text,
    ADD COLUMN finished_at timestamptz;
CREATE INDEX read_usage_jobs_finished_idx ON read_usage_jobs (finished_at)
    WHERE finished_at IS NOT NULL;

-- Runs ranked by a metric they reported (`GET /leaderboards/{metric}`): find the runs that
-- reported it without scanning every run.
CREATE INDEX read_runs_metrics_idx ON read_runs USING gin (last_metrics);
