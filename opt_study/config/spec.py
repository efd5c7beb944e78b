"""The study spec: YAML -> frozen, typed, validated config objects.

Every component owns a frozen dataclass (levanter-style); `opt_study.config.load` parses YAML
with a safe loader, builds the dataclasses field by field and reports the first problem as a
`ConfigError` that names the file, the dotted field path and what is allowed. Nothing here starts
Ray, DeepSpeed or MLflow, and nothing here imports torch: a workload's typed parameters and the
optimizer registry checks are applied by `opt_study.validate`, a layer above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from opt_study.config.errors import ConfigError as ConfigError  # re-exported: config.spec.ConfigError
from opt_study.config.errors import FieldError
from opt_study.config.measure import CurvatureBatch as CurvatureBatch  # re-exported
from opt_study.config.measure import MeasureConfig
from opt_study.config.space import Domain
from opt_study.storage import layout, names, objectstore, uris

MAX_CONFIG_BYTES = 1 << 20  # a study spec is a page of YAML; refuse anything absurd
MAX_TRIALS = 100_000  # planned trials per study; the plan is materialised before anything runs


def check_name(value: str, what: str) -> None:
    """The storage name rule (opt_study.storage.names) as a FieldError on field ``what``."""
    if not names.is_safe_name(value):
        raise FieldError(what, f"{value[:60]!r} is not a safe name: use {names.RULE}")


# ---------------------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class StudyConfig:
    """Identity and storage of a study."""

    name: str  # the study folder under storage and the MLflow experiment opt_study/<name>; [A-Za-z0-9_.-]
    seeds: tuple[int, ...] = (0,)  # every configuration is run once per seed (a study dimension)
    storage: str = "results"  # storage root; relative paths are relative to the working directory
    mlflow_uri: str | None = None  # default: sqlite:///<abs storage>/mlflow.db
    description: str = ""  # free text (Markdown) shown on the study's MLflow parent run

    def __post_init__(self):
        check_name(self.name, "name")
        if not self.seeds:
            raise FieldError("seeds", "give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise FieldError("seeds", "seeds must be distinct")
        if any(s < 0 or s >= 2**31 for s in self.seeds):
            raise FieldError("seeds", "seeds must be in [0, 2**31)")
        if not self.storage or "\0" in self.storage:
            raise FieldError("storage", "must be a non-empty path without NUL bytes")
        if objectstore.is_uri(self.storage):
            problem = objectstore.check_uri(self.storage)
            if problem:  # redacted: the message must not print the secret it refuses
                raise FieldError("storage", f"{uris.redact(self.storage)[:80]!r} {problem}")
            if self.mlflow_uri is None:
                # the default SQLite file would live only in this machine's working copy
                raise FieldError(
                    "mlflow_uri",
                    "is required when storage is an object-store URI: "
                    "give a tracking server (http://host:5000, see cluster/README.md) "
                    "or a local sqlite:////abs/path/mlflow.db",
                )
        if self.mlflow_uri is not None:
            # kept in spec.yaml, printed by validate and run, pickled by Tune with the spec
            problem = uris.tracking_uri_problem(self.mlflow_uri)
            if problem:
                raise FieldError("mlflow_uri", f"{uris.redact(self.mlflow_uri)[:80]!r} {problem}")


@dataclass(frozen=True)
class WorkloadConfig:
    """`type` picks the workload; `params` is that workload's own frozen config."""

    type: str  # a built-in workload (below), module:Class, or an entry-point name (group opt_study.workloads)
    params: Any = None  # the workload's own keys, written beside type; typed by its config class


@dataclass(frozen=True)
class ScaleConfig:
    """How big one trial is: its worker group and DeepSpeed settings."""

    workers: int = 1  # ranks per trial: one DeepSpeed process each (see launcher)
    gpus_per_worker: int = 0  # 0 = CPU (gloo); 1 = one GPU per worker (nccl)
    # auto = cuda if gpus_per_worker else cpu; cpu = train on CPU (gloo) even while reserving GPUs (simulated cluster)
    accelerator: str = "auto"
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per rank; with the cluster size, sets how many trials run at once
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    # fp32 | bf16 (ZeRO 1-3; measured losses re-evaluated in fp32) | fp16 (GPU only)
    precision: str = "fp32"
    micro_batch_size: int = 8  # samples per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = workers x micro_batch_size x grad_accum
    # auto: in_process for one worker, pool otherwise (ranks on warm actors reused across trials);
    # worker_group: a Ray Train group per trial (docs/DESIGN.md §Launchers)
    launcher: str = "auto"
    torch_threads: int = 1  # per worker; CPU trials oversubscribe cores otherwise

    def __post_init__(self):
        if not 1 <= self.workers <= 4096:
            raise FieldError("workers", "must be an integer in [1, 4096]")
        if self.gpus_per_worker not in (0, 1):
            raise FieldError("gpus_per_worker", "must be 0 (CPU) or 1 (one GPU per worker rank)")
        if not 0 < self.cpus_per_worker <= 256:
            raise FieldError("cpus_per_worker", "must be in (0, 256]")
        if self.zero_stage not in (0, 1, 2, 3):
            raise FieldError("zero_stage", "must be one of 0, 1, 2, 3")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise FieldError("precision", "must be one of fp32, bf16, fp16")
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise FieldError("accelerator", "must be one of auto, cpu, cuda")
        if self.accelerator == "cuda" and self.gpus_per_worker == 0:
            raise FieldError("accelerator", "cuda needs gpus_per_worker: 1 (a GPU reserved for each rank)")
        if self.precision == "fp16" and self.device == "cpu":
            raise FieldError("precision", "fp16 needs a GPU; use fp32 or bf16 on CPU")
        if not 1 <= self.micro_batch_size <= 1 << 20:
            raise FieldError("micro_batch_size", "must be an integer in [1, 1048576]")
        if not 1 <= self.grad_accum <= 4096:
            raise FieldError("grad_accum", "must be an integer in [1, 4096]")
        if self.launcher not in ("auto", "in_process", "worker_group", "pool"):
            raise FieldError("launcher", "must be one of auto, in_process, worker_group, pool")
        if self.launcher == "in_process" and self.workers != 1:
            raise FieldError("launcher", "in_process runs exactly one worker; set workers: 1 or use worker_group")
        if not 1 <= self.torch_threads <= 256:
            raise FieldError("torch_threads", "must be an integer in [1, 256]")

    # The one place that maps the scale to Ray resources, the torch backend and DeepSpeed's
    # accelerator (opt_study.study.launch, opt_study.study.run, opt_study.trial.engine): reserving
    # GPUs and computing on them are separate, so a loopback cluster with logical GPUs
    # (`ray start --num-gpus 8` on a CPU machine) schedules like a GPU cluster while ranks train on CPU.
    @property
    def device(self) -> str:
        """Where each rank computes: "cuda" or "cpu" (also DeepSpeed's DS_ACCELERATOR)."""
        if self.accelerator != "auto":
            return self.accelerator
        return "cuda" if self.gpus_per_worker else "cpu"

    @property
    def dist_backend(self) -> str:
        """The torch.distributed backend of a trial's ranks."""
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def ray_resources_per_worker(self) -> dict:
        """The Ray resources one rank reserves: its CPUs, and one (possibly logical) GPU when
        gpus_per_worker is 1, whatever it computes on."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}

    @property
    def resolved_launcher(self) -> str:
        if self.launcher != "auto":
            return self.launcher
        return "in_process" if self.workers == 1 else "pool"


@dataclass(frozen=True)
class ScheduleConfig:
    """LR multiplier over training: linear warmup, then `type` decay (opt_study.optim.lr_factor).

    cosine_restarts (SGDR) needs `period` (steps of the first cycle after warm-up; each next
    cycle is `mult` times longer); wsd / trapezoidal (warmup-stable-decay) decays linearly over
    the last `decay_fraction` of the steps.
    """

    type: str = "constant"  # constant | linear | cosine | cosine_restarts (SGDR) | wsd | trapezoidal (= wsd)
    warmup_steps: int = 0  # linear warm-up from 0 to the full learning rate over these steps
    min_ratio: float = 0.0  # the multiplier the decay ends at (a fraction of the peak learning rate)
    period: int | None = None  # cosine_restarts only
    mult: float = 1.0  # cosine_restarts only
    decay_fraction: float = 0.2  # wsd / trapezoidal only

    TYPES = ("constant", "linear", "cosine", "cosine_restarts", "wsd", "trapezoidal")

    def __post_init__(self):
        if self.type not in self.TYPES:
            raise FieldError("type", f"must be one of {', '.join(self.TYPES)}")
        if self.warmup_steps < 0:
            raise FieldError("warmup_steps", "must be >= 0")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise FieldError("min_ratio", "must be in [0, 1]")
        if self.type == "cosine_restarts":
            if self.period is None or not 1 <= self.period <= 10**9:
                raise FieldError("period", "cosine_restarts needs period: the first cycle's length in steps, >= 1")
        elif self.period is not None:
            raise FieldError("period", "is used by type cosine_restarts only; remove it or set type: cosine_restarts")
        if not 1.0 <= self.mult <= 1e6:
            raise FieldError("mult", "must be in [1, 1e6] (each restart cycle is mult times the previous)")
        if self.mult != 1.0 and self.type != "cosine_restarts":
            raise FieldError("mult", "is used by type cosine_restarts only")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise FieldError("decay_fraction", "must be in (0, 1] (the fraction of steps spent decaying)")


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 100  # optimizer steps per trial (the budget of every trial)
    # Evaluation and Tune report cadence (ASHA decides at these points); null = min(50, steps),
    # so a short run does not fail on a default the user never wrote.
    eval_every: int | None = None
    grad_clip: float | None = None  # global-norm clipping (DeepSpeed gradient_clipping)
    schedule: ScheduleConfig = ScheduleConfig()  # the learning-rate schedule (training.schedule below)
    log_every: int = 1  # Parquet row cadence: 1 = every step
    checkpoint_every: int | None = None  # DeepSpeed checkpoint cadence; null: every eval; 0: never
    max_failures: int = 2  # restarts of a trial (from its last checkpoint) before it is failed
    divergence_factor: float | None = 10.0  # loss > factor x first loss ends the trial: diverged

    def __post_init__(self):
        if not 1 <= self.steps <= 10**9:
            raise FieldError("steps", "must be an integer in [1, 1e9]")
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", min(50, self.steps))
        if not 1 <= self.eval_every <= self.steps:
            raise FieldError("eval_every", f"must be in [1, steps={self.steps}]")
        if self.grad_clip is not None and not (0 < self.grad_clip < math.inf):
            raise FieldError("grad_clip", "must be a positive finite number or null")
        if self.schedule.warmup_steps > self.steps:
            raise FieldError("schedule.warmup_steps", f"must be <= steps={self.steps}")
        if not 1 <= self.log_every <= self.steps:
            raise FieldError("log_every", f"must be in [1, steps={self.steps}]")
        if self.checkpoint_every is not None and not 0 <= self.checkpoint_every <= self.steps:
            raise FieldError("checkpoint_every", f"must be in [0, steps={self.steps}] or null (every eval)")
        if not 0 <= self.max_failures <= 100:
            raise FieldError("max_failures", "must be in [0, 100]")
        if self.divergence_factor is not None and not 1 < self.divergence_factor < math.inf:
            raise FieldError("divergence_factor", "must be a finite number > 1, or null (NaN/inf only)")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer to compare and its hyperparameter space (fixed values or search domains)."""

    name: str  # a built-in optimizer (opt_study/optim/zoo.py), module:attr, or an entry-point name
    # the hyperparameters (YAML key `params`): a scalar is fixed, a domain ({grid: ..}, {loguniform: [lo, hi]},
    # ...) is searched; empty: the optimizer's defaults (or a protocol's default space)
    space: Mapping[str, Domain]
    label: str = ""  # distinguishes two entries of the same optimizer; defaults to name
    # From the optimizer registry, filled by opt_study.validate: the rule's default
    # hyperparameters, and the default search space a tuning protocol uses when `space` is empty.
    defaults: Mapping[str, Any] | None = None
    default_space: Mapping[str, Domain] | None = None  # from the registry, like defaults


@dataclass(frozen=True)
class AshaConfig:
    metric: str = "eval_loss"  # what ASHA ranks trials by: eval_loss or loss (lower is better)
    grace_period: int = 1  # in evaluations (Tune "training_iteration")
    reduction_factor: int = 2  # ASHA keeps 1 / reduction_factor of the trials at each rung

    def __post_init__(self):
        if self.metric not in ("eval_loss", "loss"):
            raise FieldError("metric", "must be eval_loss or loss")
        if self.grace_period < 1:
            raise FieldError("grace_period", "must be >= 1")
        if self.reduction_factor < 2:
            raise FieldError("reduction_factor", "must be >= 2")


@dataclass(frozen=True)
class BudgetsConfig:
    """Crowded Valley's nested tuning budgets: random-search samples per optimizer per level.

    Nested (Schmidt, Schneider & Hennig 2021, https://arxiv.org/abs/2007.01547): the small
    budget's trials are the first `small` of the medium's, which are the first `medium` of the
    large's, so only `large` (or `medium` when large is null) configurations are trained.
    """

    small: int = 4  # samples of the small budget
    medium: int = 10  # samples of the medium budget (>= small)
    large: int | None = 25  # null: two levels only

    def __post_init__(self):
        if not 1 <= self.small <= 100_000:
            raise FieldError("small", "must be an integer in [1, 100000]")
        if not self.small <= self.medium <= 100_000:
            raise FieldError("medium", f"must be in [small={self.small}, 100000] (budgets are nested)")
        if self.large is not None and not self.medium <= self.large <= 100_000:
            raise FieldError("large", f"must be in [medium={self.medium}, 100000] or null (budgets are nested)")

    def levels(self) -> tuple[tuple[str, int], ...]:
        """(name, samples) from the smallest level up."""
        out = (("small", self.small), ("medium", self.medium), ("large", self.large))
        return tuple((k, n) for k, n in out if n is not None)


@dataclass(frozen=True)
class TargetConfig:
    """A target loss. AlgoPerf: a trial reaches it at the first evaluation with metric <= value;
    steps_to_target: the validation loss (metric eval_loss) the confirmation seeds must beat."""

    value: float  # the loss to reach
    metric: str = "eval_loss"  # eval_loss or loss (steps_to_target: eval_loss only)

    def __post_init__(self):
        if self.metric not in ("eval_loss", "loss"):
            raise FieldError("metric", "must be eval_loss or loss")


@dataclass(frozen=True)
class SearchConfig:
    """How each optimizer's space becomes trials (opt_study.study.plan_trials).

    `method`: random (seeded draws), quasirandom (scrambled Sobol, opt_study.config.space) or tpe
    (Optuna's TPE through Ray Tune, opt_study.plan.tpe: `samples` configurations per optimizer
    proposed online, each run once per study seed; its first `tpe_startup_trials` are random);
    null means the protocol's own (quasirandom for algoperf_external, random otherwise).
    `protocol` names a fair-tuning template: none (grid x samples per optimizer),
    crowded_valley (one-shot at defaults, nested random-search budgets, best reruns with
    `rerun_seeds`), algoperf_external (`studies` independent quasi-random studies of
    `samples` trials, with a `target` for time-to-target) or steps_to_target (modded-nanogpt's
    optimizer track, opt_study.plan.protocols.plan_steps_to_target: `samples` configurations per
    optimizer trained to the end of the schedule, the best rerun with `rerun_seeds`, scored by
    steps to `target` with a one-sided t-test at level `alpha`, opt_study.report.significance).
    """

    samples: int = 1  # draws per optimizer (times its grid); per study under algoperf_external
    seed: int = 0  # seeds the draws (random, quasirandom, TPE), so a plan is reproducible
    asha: AshaConfig | None = None  # per-optimizer ASHA early stopping (search.asha below); null: off
    max_concurrent_trials: int | None = None  # cap on trials at once; null: autoscaler max, else all ready
    method: str | None = None  # random | quasirandom | tpe; null: the protocol's own
    protocol: str = "none"  # none | crowded_valley | algoperf_external | steps_to_target
    budgets: BudgetsConfig = BudgetsConfig()  # crowded_valley only
    # crowded_valley: the reruns' seeds (10 in the paper); steps_to_target: the confirmation seeds
    rerun_seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    studies: int = 1  # algoperf_external only
    target: TargetConfig | None = None  # algoperf_external and steps_to_target (required there)
    alpha: float = 0.01  # steps_to_target: significance level (modded-nanogpt's p < 0.01)
    tpe_startup_trials: int = 10  # tpe only: random configurations before TPE's model (Optuna's default)

    METHODS = ("random", "quasirandom", "tpe")
    PROTOCOLS = ("none", "crowded_valley", "algoperf_external", "steps_to_target")

    def __post_init__(self):
        if not 1 <= self.samples <= 100_000:
            raise FieldError("samples", "must be an integer in [1, 100000]")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise FieldError("max_concurrent_trials", "must be >= 1 or null")
        if self.method is not None and self.method not in self.METHODS:
            raise FieldError("method", "must be random, quasirandom or tpe (or null: the protocol's own)")
        self._check_tpe()
        if self.protocol not in self.PROTOCOLS:
            raise FieldError("protocol", f"must be one of {', '.join(self.PROTOCOLS)}")
        if self.protocol != "none" and self.asha is not None:
            # per-label ASHA would race one-shot, search and rerun trials (or studies) together
            raise FieldError("asha", f"protocol {self.protocol} trains every trial to the end; remove asha")
        if (
            not self.rerun_seeds
            or len(set(self.rerun_seeds)) != len(self.rerun_seeds)
            or any(not 0 <= s < 2**31 for s in self.rerun_seeds)
        ):
            raise FieldError("rerun_seeds", "must be a non-empty list of distinct seeds in [0, 2**31)")
        if not 1 <= self.studies <= 1000 or self.studies * self.samples > 100_000:
            raise FieldError("studies", "must be in [1, 1000] with studies x samples <= 100000")
        if self.protocol == "algoperf_external":
            if self.method == "random":
                raise FieldError(
                    "method",
                    "algoperf_external searches quasi-randomly (Dahl et al. 2023); set quasirandom or leave it out",
                )
            if self.target is None:
                raise FieldError("target", "algoperf_external needs target: {metric: eval_loss, value: X}")
        elif self.studies != 1:
            raise FieldError("studies", "is used by protocol algoperf_external only")
        self._check_steps_to_target()

    def _check_steps_to_target(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise FieldError("alpha", "must be in (0, 0.5): the one-sided significance level")
        if self.protocol != "steps_to_target":
            if self.alpha != 0.01:
                raise FieldError("alpha", "is used by protocol steps_to_target only")
            return
        if self.target is None:
            raise FieldError("target", "steps_to_target needs target: {value: X} (a validation loss)")
        if self.target.metric != "eval_loss":
            raise FieldError("target.metric", "steps_to_target counts steps to a validation loss: use eval_loss")
        if len(self.rerun_seeds) < 2:
            raise FieldError("rerun_seeds", "steps_to_target needs at least 2 confirmation seeds (σ is measured)")

    def _check_tpe(self) -> None:
        if not 1 <= self.tpe_startup_trials <= 100_000:
            raise FieldError("tpe_startup_trials", "must be an integer in [1, 100000]")
        if self.method != "tpe":
            return
        if self.protocol != "none":
            raise FieldError(
                "method",
                f"tpe is for protocol none; {self.protocol} fixes its own search (remove method or set protocol: none)",
            )
        if self.tpe_startup_trials >= self.samples:
            raise FieldError(
                "tpe_startup_trials",
                f"must be below samples={self.samples}: TPE draws its first "
                f"{self.tpe_startup_trials} configurations at random, so with these numbers it "
                "never uses its model (lower tpe_startup_trials or raise samples)",
            )

    @property
    def resolved_method(self) -> str:
        if self.method is not None:
            return self.method
        return "quasirandom" if self.protocol == "algoperf_external" else "random"


@dataclass(frozen=True)
class Spec:
    """A whole study: what `opt-study run FILE` executes."""

    study: StudyConfig  # identity and storage
    workload: WorkloadConfig  # the model and data
    optimizers: tuple[OptimizerSpec, ...]  # the optimizers to compare, each with its space
    scale: ScaleConfig = ScaleConfig()  # one trial's worker group and DeepSpeed settings
    training: TrainingConfig = TrainingConfig()  # the training loop
    search: SearchConfig = SearchConfig()  # how spaces become trials
    measure: MeasureConfig = MeasureConfig()  # what is measured beyond the loss
    source: str = "<memory>"  # the file it came from, for messages

    @property
    def storage_root(self) -> Path:
        """Where this machine reads and writes the study: the storage path itself, or for an
        object-store URI its local working copy (opt_study.storage.objectstore mirrors it)."""
        if objectstore.is_uri(self.study.storage):
            return objectstore.attach(self.study.storage)
        return Path(self.study.storage).expanduser().resolve()

    @property
    def study_dir(self) -> Path:
        """The study folder, symlink-safe: ValueError if it would resolve outside the root."""
        return layout.study_dir(self.storage_root, self.study.name)

    @property
    def tracking_uri(self) -> str:
        return self.study.mlflow_uri or f"sqlite:///{self.storage_root / 'mlflow.db'}"
