"""The two trial launchers, as Ray Tune function trainables.

- worker_group: the Ray Train V2 pattern that works under Tune (docs/STACK.md §Ray Tune and
  Train): the trainable builds and fits a TorchTrainer whose workers run `run_trial`;
  TuneReportCallback forwards rank 0's reports to Tune. (`Tuner(trainer)` fails in Ray 2.60.)
- pool: the trial's ranks on warm Ray actors reused across trials (opt_study.study.pool).
- in_process: one worker, the DeepSpeed engine in the Tune trial's own process (a process group
  of one), so small studies do not pay a worker group's start-up for each trial.
"""

from __future__ import annotations

from opt_study.config import Spec
from opt_study.plan import TrialPlan
from opt_study.storage import layout, objectstore
from opt_study.study.console import board_poster
from opt_study.study.reporting import is_new_report
from opt_study.study.reporting import quiet as _quiet

DRIVER_MEMORY = 256 * 2**20  # bytes reserved for a worker-group trial's driver process


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def in_process_trainable(config: dict, spec: Spec, board=None) -> None:
    from ray import tune

    from opt_study.trial.loop import run_trial

    _quiet()
    plan = TrialPlan(**config["trial"])
    progress = board_poster(board, plan.trial_id)
    run_trial(spec, plan, report=tune.report, node=_node_id(), progress=progress)


def _worker_loop(cfg: dict) -> None:
    import ray.train

    from opt_study.trial.loop import run_trial

    _quiet()
    plan = TrialPlan(**cfg["trial"])
    progress = board_poster(cfg.get("board"), plan.trial_id)
    run_trial(cfg["spec"], plan, report=ray.train.report, node=_node_id(), progress=progress, repeat_report=True)


def _report_once_callback():
    """Ray Train's TuneReportCallback, forwarding each trial step at most once (is_new_report).
    It lives in Ray Train's controller, which outlives the worker groups it restarts."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportOnce(TuneReportCallback):
        last_step: int | None = None

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and is_new_report(self.last_step, metrics[0]):
                self.last_step = metrics[0].get("step", self.last_step)
                super().after_report(run_context, metrics, checkpoint)

    return ReportOnce()


def worker_group_trainable(config: dict, spec: Spec, board=None) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = config["trial"]
    s = spec.scale
    # use_gpu only reserves (Ray refuses GPU in resources_per_worker without it); where the
    # ranks compute is s.device, so logical GPUs on a CPU machine train on CPU over gloo
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"spec": spec, "trial": plan, "board": board},
        torch_config=TorchConfig(backend=s.dist_backend),
        scaling_config=ScalingConfig(
            num_workers=s.workers, use_gpu=bool(s.gpus_per_worker), resources_per_worker=s.ray_resources_per_worker
        ),
        run_config=RunConfig(
            name=plan["trial_id"],
            **objectstore.ray_storage(layout.ray_train_dir(spec.study_dir)),
            callbacks=[_report_once_callback()],
            # a dead worker: Ray Train restarts the group, and run_trial resumes
            # from the trial's last checkpoint (opt_study.trial.checkpoint)
            failure_config=FailureConfig(max_failures=spec.training.max_failures),
        ),
    )
    trainer.fit()


def trainable_for(spec: Spec, board=None, keeper=None):
    """The Tune trainable with its resources: what one trial of this spec holds while it runs;
    `board` (opt_study.study.console.progress_board) receives its progress between evaluations;
    `keeper` (opt_study.study.pool.make_keeper) lends the `pool` launcher's warm rank actors."""
    from ray import tune

    s = spec.scale
    if s.resolved_launcher == "in_process":
        res = s.ray_resources_per_worker
        return tune.with_resources(tune.with_parameters(in_process_trainable, spec=spec, board=board), res)
    # The trainable only drives the worker group (or the pool's slot), which reserves its own
    # CPUs/GPUs; it asks for memory alone (Tune refuses an all-zero request) so it never takes a
    # CPU from the workers.
    if s.resolved_launcher == "pool":
        from opt_study.study.pool import pool_trainable

        fn = tune.with_parameters(pool_trainable, spec=spec, keeper=keeper, board=board)
    else:
        fn = tune.with_parameters(worker_group_trainable, spec=spec, board=board)
    return tune.with_resources(fn, {"CPU": 0, "memory": DRIVER_MEMORY})
