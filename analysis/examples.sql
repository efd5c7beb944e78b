-- Example queries over a study folder. Run one with
--   opt-study query results/quickstart "<the statement>"          (add --csv out.csv to save it)
-- or from Python: opt_study.results.query.query("results/quickstart", sql) -> pyarrow.Table.
-- Views: steps (one row per trial and step, last attempt wins), trials (one row per planned
-- trial; "hp.<name>" and "summary.<name>" columns must be quoted), steps_hp (steps joined with
-- label, optimizer, workload, seed, status, index and the "hp.<name>" columns), groups (the
-- per-parameter-group raw sums), replay (checkpoint replay, where present).
-- Statements are separated by a line holding only ';' below (tests run every one of them).

-- 1. How many trials in each status, per optimizer (diverged and failed ones included).
SELECT optimizer, status, count(*) AS trials
FROM trials GROUP BY ALL ORDER BY optimizer, status
;
-- 2. Best validation loss of every trial, with its hyperparameters, best first.
SELECT t.trial_id, t.optimizer, t."hp.lr", t.seed, t.status, min(s.eval_loss) AS best_eval_loss
FROM steps s JOIN trials t USING (trial_id)
WHERE isfinite(s.eval_loss)
GROUP BY ALL ORDER BY best_eval_loss
;
-- 3. The paper's per-trial fractions (arXiv:2407.01825): how often the forward convexity
--    inequality holds / is violated / is indeterminate on measured, unflagged steps.
SELECT trial_id, optimizer,
       avg((cls_convexity_fwd = 'holds')::INT) AS frac_fwd_holds,
       avg((cls_convexity_fwd = 'violated')::INT) AS frac_fwd_violated,
       avg((cls_convexity_fwd = 'indeterminate')::INT) AS frac_fwd_indeterminate
FROM steps_hp
WHERE measured AND coalesce(flag, '') = '' AND cls_convexity_fwd IS NOT NULL
GROUP BY ALL ORDER BY trial_id
;
-- 4. Effective smoothness ratio per trial: sums before the ratio (docs/METRICS.md §Aggregates).
SELECT trial_id,
       sum((loss_probe - loss) - probe_s * ip_grad_update)
         / sum(0.5 * probe_s * probe_s * sq_update) AS smoothness_ratio
FROM steps
WHERE measured AND coalesce(flag, '') = ''
GROUP BY trial_id ORDER BY trial_id
;
-- 5. Local smoothness against gradient norm, for a (L0, L1) scatter of your own.
SELECT optimizer, "hp.lr", grad_norm, smoothness_local
FROM steps_hp
WHERE measured AND isfinite(smoothness_local)
ORDER BY optimizer, grad_norm
;
-- 6. Which parameter group moves most relative to its size (‖Δ‖/‖x‖), averaged over training.
SELECT trial_id, group_name, avg(sqrt(sq_update / sq_param)) AS mean_update_to_param
FROM groups
WHERE sq_param > 0
GROUP BY ALL ORDER BY trial_id, mean_update_to_param DESC
;
-- 7. Loss curve of one optimizer's trials, every 10th step (for plotting elsewhere).
SELECT trial_id, step, loss, eval_loss
FROM steps_hp
WHERE step % 10 = 0 AND optimizer = (SELECT min(optimizer) FROM trials)
ORDER BY trial_id, step
;
-- 8. Trials that produced a non-finite loss, and the first step where it happened.
SELECT trial_id, min(step) AS first_bad_step
FROM steps
WHERE loss IS NOT NULL AND NOT isfinite(loss)
GROUP BY trial_id
