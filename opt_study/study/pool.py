"""The `pool` launcher: a trial's ranks run on warm Ray actors that outlive the trial.

A worker-group trial (launch.worker_group_trainable) boots a Ray Train controller, a sync actor
and one process per rank, each importing torch, DeepSpeed and opt_study, for every trial: about
25 s before a 2-rank CPU trial's first step (benchmarks/RESULTS.md §2). Here those processes are
kept: a *slot* is one placement group (one bundle per rank, gang-reserved, PACK: on one node
when it fits, spread over nodes when not) with one `PoolRank` actor per bundle, built once with
torch and DeepSpeed imported, and lent to one trial after another. Per trial only a fresh
torch.distributed group is made (a new port, rank 0's address) and torn down afterwards, with
DeepSpeed's module-level group references (measure.deepspeed_state.forget_process_group) and
the global RNG reset to a fresh process's, so a trial on a reused slot stores the same rows as on
fresh processes (tests/e2e/test_pool.py).

What Ray Train V2 gave the worker_group launcher, and how it is kept here:

- restart on worker death: a rank actor that dies (or raises) fails its trial's attempt; the
  trainable discards the slot (kills its actors, removes its placement group), takes another and
  runs the trial again, up to `training.max_failures` times; run_trial resumes from the trial's
  last checkpoint (opt_study.trial.checkpoint), as under Ray Train. The trainable waits on every
  rank at once (ray.wait), so the first rank to fail ends the attempt, whatever the others wait on;
- rendezvous: rank 0 serves the group's store on a port the OS gives it as it binds
  (distributed.rendezvous_store), so no other process can take the port between choosing and
  binding it; ranks not joined RENDEZVOUS_S after the attempt began fail it (the slot is
  discarded: its processes are killed wherever they wait) instead of waiting out gloo's 30 min;
- placement across nodes: the slot's placement group, as Ray Train's own worker group makes;
- cooperative stop: unchanged (opt_study.trial.control): rank 0 polls the stop file ASHA writes;
- each report reaching Tune once: a restarted attempt repeats the reports its checkpoint carries
  and the trainable forwards only steps after the last one it forwarded (reporting.is_new_report).

- a trial Tune ends (it stops the trainable, as at a trial stop or error, or kills it, as at the
  study's end): `tune.report` raises SystemExit in a stopped trainable; the trainable then asks rank
  0 to stop (control.stop_here: the next step's stop vote ends every rank together), waits
  STOP_GRACE_S for the ranks and lends the slot again, or discards it when they do not end. A
  trainable killed outright can do neither: its slot's lease, renewed every RENEW_S while a
  trial runs on it, expires after LEASE_S and the keeper discards the slot.

A slot is recycled (its processes replaced) after RECYCLE_AFTER trials: a reused process grows by
about 0.7 MiB per trial (issue 16). The keeper, which owns every slot, lives as long as the Tune
run; run.py closes it, which also ends any rank a killed trainable left running.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field

RECYCLE_AFTER = 50  # trials per slot before its processes are replaced
POLL_S = 0.05  # how often the trainable collects rank 0's reports and the ranks' results
# Seconds from an attempt's start until every rank must have joined its group. Joining is the
# first thing a warm rank does (no imports), so this is a dead or stuck peer, even at load ~80.
RENDEZVOUS_S = 300.0
STOP_GRACE_S = 30.0  # a stopped trainable's wait for its ranks to stop at their next step
RENEW_S = 5.0  # how often a trainable renews its slot's lease
LEASE_S = 120.0  # a lent slot not renewed this long has lost its trainable: the keeper discards it


class AttemptFailed(RuntimeError):
    """An attempt that failed without a rank failing (its ranks never all joined)."""


def _slot_env(device: str) -> dict:
    """What a rank process needs before torch and DeepSpeed are imported (engine.setup_process
    sets the same per trial): DeepSpeed picks its accelerator once, at import."""
    return {"DS_ACCELERATOR": device}


class PoolRank:
    """One rank process of a slot. `run` trains one trial's rank; rank 0's reports wait in
    `_reports` until the trainable takes them (a second method thread: max_concurrency=2)."""

    def __init__(self, device: str):
        os.environ.update(_slot_env(device))
        import deepspeed  # noqa: F401 - the import a trial would otherwise pay (seconds)
        import torch

        from opt_study.trial import loop  # noqa: F401 - opt_study's own imports, once

        self._seed = torch.initial_seed()  # a fresh process's default generator seed
        self._reports: list = []
        self._lock = threading.Lock()
        self._store = None  # rank 0's rendezvous store of the current attempt
        self._joined = False

    def where(self) -> tuple[str, str]:
        """(node id, node IP): rank 0's IP is the trial's rendezvous address."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def open_rendezvous(self, world: int) -> int:
        """Rank 0: serve the next attempt's group store; returns its port."""
        from opt_study import distributed

        self._store = distributed.rendezvous_store(world, RENDEZVOUS_S)
        return self._store.port

    def run(self, spec, plan: dict, env: dict, node: str, board=None) -> dict:
        from opt_study import distributed
        from opt_study.plan import TrialPlan
        from opt_study.study.console import board_poster
        from opt_study.study.reporting import quiet
        from opt_study.trial.loop import run_trial

        quiet()
        os.environ.update(env)
        self._fresh_rng()
        with self._lock:
            self._reports.clear()
        self._joined = False
        p = TrialPlan(**plan)
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
            distributed.join(spec.scale.dist_backend, rank, world, addr, port, RENDEZVOUS_S, store=self._store)
            self._joined = True
            return run_trial(
                spec,
                p,
                report=self._report,
                node=node,
                progress=board_poster(board, p.trial_id) if env["RANK"] == "0" else None,
                repeat_report=True,
            )
        finally:
            self._forget_trial(p.trial_id)

    def poll(self) -> tuple[list, bool]:
        """Rank 0's reports since the last poll, and whether its group is joined (every peer
        arrived)."""
        with self._lock:
            out, self._reports = self._reports, []
        return out, self._joined

    def stop(self, trial_id: str) -> None:
        """Rank 0: end the running trial at its next step, on every rank (its stop vote)."""
        from opt_study.trial import control

        control.stop_here(trial_id)

    def _report(self, metrics: dict) -> None:
        if os.environ.get("RANK") == "0":  # every rank reports; rank 0's are the trial's
            with self._lock:
                self._reports.append(dict(metrics))

    def _fresh_rng(self) -> None:
        """The global RNGs as a fresh process has them (torch's default seed; Python's and
        NumPy's are seeded from the OS in a fresh process, so nothing may depend on them)."""
        import torch

        torch.manual_seed(self._seed)

    def _forget_trial(self, trial_id: str) -> None:
        """What a finished trial leaves in the process: its process group and store, DeepSpeed's
        references to it, a stop request, its engine's memory."""
        from opt_study import distributed
        from opt_study.measure import deepspeed_state
        from opt_study.trial import control

        distributed.destroy()
        deepspeed_state.forget_process_group()
        self._store = None
        control.forget_stop_here(trial_id)
        gc.collect()


@dataclass
class Slot:
    """A gang of rank actors on one placement group, lent to one trial at a time."""

    key: int
    pg: object
    ranks: list
    uses: int = 0
    nodes: list = field(default_factory=list)  # (node id, IP) per rank
    renewed: float = 0.0  # the keeper's clock (time.monotonic) when its borrower last renewed it


class PoolKeeper:
    """Owns every slot of a study's Tune run (a Ray actor, no CPU; threaded so several trainables
    can wait in `acquire` at once). All slots of a study have one shape: the spec's scale."""

    def __init__(self, workers: int, per_worker: dict, device: str, lease_s: float = LEASE_S):
        self.workers, self.per_worker, self.device = workers, per_worker, device
        self.idle: list[Slot] = []
        self.all: dict[int, Slot] = {}
        self.made = 0
        self.lock = threading.Lock()
        self.lease_s = lease_s
        self.closed = threading.Event()
        threading.Thread(target=self._reclaim, daemon=True).start()

    def acquire(self) -> Slot:
        """An idle slot, else a new one once the cluster has room for it. A slot freed while this
        waits is taken instead (the pending placement group is then removed): an idle slot holds
        the very resources the new one waits for."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = None
        while True:
            with self.lock:
                if self.idle:
                    if pg is not None:
                        remove_placement_group(pg)
                    slot = self.idle.pop()
                    slot.renewed = time.monotonic()
                    return slot
            if pg is None:
                pg = placement_group([dict(self.per_worker) for _ in range(self.workers)], strategy="PACK")
            if pg.wait(timeout_seconds=0.2):
                return self._build(pg, ray)

    def _build(self, pg, ray) -> Slot:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts = {"num_cpus": self.per_worker.get("CPU", 0), "num_gpus": self.per_worker.get("GPU", 0)}
        cls = ray.remote(max_concurrency=2)(PoolRank)
        ranks = [
            cls.options(
                **opts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(self.device)
            for i in range(self.workers)
        ]
        try:
            nodes = ray.get([r.where.remote() for r in ranks])
        except BaseException:  # a rank died starting (e.g. out of memory): nothing of it stays
            self._kill(ranks, pg)
            raise
        with self.lock:
            self.made += 1
            slot = Slot(self.made, pg, ranks, nodes=nodes, renewed=time.monotonic())
            self.all[slot.key] = slot
        return slot

    def renew(self, key: int) -> None:
        """The borrower of slot `key` is alive (pool_trainable, every RENEW_S)."""
        with self.lock:
            if key in self.all:
                self.all[key].renewed = time.monotonic()

    def lent(self) -> list[int]:
        """Keys of the slots lent now (tests, diagnostics)."""
        with self.lock:
            return sorted(s.key for s in self._lent())

    def _lent(self) -> list[Slot]:
        """The slots out on loan (caller holds the lock)."""
        idle = {s.key for s in self.idle}
        return [s for k, s in self.all.items() if k not in idle]

    def _reclaim(self) -> None:
        """Discard every lent slot whose lease ran out: its trainable was killed (by Tune, at a
        trial's stop or the study's end) before it could return the slot, and its ranks would
        otherwise train on until the keeper closes."""
        while not self.closed.wait(min(self.lease_s / 4, 5.0)):
            now = time.monotonic()
            with self.lock:
                lost = [s for s in self._lent() if now - s.renewed > self.lease_s]
            for slot in lost:
                self.discard(slot)

    def release(self, slot: Slot) -> None:
        """A trial ended cleanly on `slot`: lend it again, or replace it after RECYCLE_AFTER."""
        slot = self.all.get(slot.key)
        if slot is None:
            return
        slot.uses += 1
        if slot.uses >= RECYCLE_AFTER:
            self.discard(slot)
            return
        with self.lock:
            self.idle.append(slot)

    def discard(self, slot: Slot) -> None:
        """Kill a slot's rank actors and free its placement group (a rank died or failed)."""
        with self.lock:
            slot = self.all.pop(slot.key, None)
            self.idle = [s for s in self.idle if slot is None or s.key != slot.key]
        if slot is not None:  # not discarded already (by its trainable and by its lease both)
            self._kill(slot.ranks, slot.pg)

    @staticmethod
    def _kill(ranks: list, pg) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in ranks:
            ray.kill(r)
        remove_placement_group(pg)

    def close(self) -> int:
        """Discard every slot (the Tune run ended); returns how many slots were ever built."""
        self.closed.set()
        for slot in list(self.all.values()):
            self.discard(slot)
        return self.made


def make_keeper(spec, lease_s: float = LEASE_S):
    """The keeper of a study's slots (run.py makes one per Tune run and closes it afterwards)."""
    import ray

    s = spec.scale
    keeper = ray.remote(num_cpus=0, max_concurrency=64)(PoolKeeper)
    return keeper.remote(s.workers, s.ray_resources_per_worker, s.device, lease_s)


def close_keeper(keeper) -> None:
    import ray

    try:
        ray.get(keeper.close.remote(), timeout=60)
    finally:
        ray.kill(keeper)


# ---------------------------------------------------------------------------------- trainable
def pool_trainable(config: dict, spec, keeper, board=None) -> None:
    """Tune's trainable for a `pool` trial: run it on a slot, again on a fresh slot after a rank
    died or failed (at most training.max_failures times), forwarding each report once."""
    import ray
    from ray import tune

    from opt_study.study.reporting import is_new_report

    forwarded = {"last": None}

    def forward(metrics: dict) -> None:
        if is_new_report(forwarded["last"], metrics):
            forwarded["last"] = metrics.get("step", forwarded["last"])
            tune.report(metrics)

    failures = 0
    while True:
        slot = None
        try:
            slot = ray.get(keeper.acquire.remote())
            _run_on(slot, spec, config["trial"], board, forward, keeper)
        except (ray.exceptions.RayError, AttemptFailed) as e:  # a rank died (ActorDiedError) or raised
            if slot is not None:
                keeper.discard.remote(slot)
            failures += 1
            if failures > spec.training.max_failures:
                raise RuntimeError(f"trial failed on {failures} slot(s); last error: {e}") from e
            continue
        # waited for: the trial Tune schedules next on this reused trainable must find it idle
        ray.get(keeper.release.remote(slot))
        return


def _run_on(slot: Slot, spec, plan: dict, board, forward, keeper) -> None:
    """One attempt of the trial on `slot`'s ranks: a fresh rendezvous (rank 0's IP and the port
    of the store it serves), rank 0's reports forwarded while it runs, the first failure raised.
    Ended from outside (Tune stopping the trainable: SystemExit from tune.report), it stops the
    ranks first (_stop)."""
    import ray

    world = len(slot.ranks)
    port = ray.get(slot.ranks[0].open_rendezvous.remote(world))
    local = _local_ranks([n for n, _ in slot.nodes])
    refs = []
    for i, r in enumerate(slot.ranks):
        env = {
            "RANK": str(i),
            "WORLD_SIZE": str(world),
            # a GPU actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES per actor)
            "LOCAL_RANK": "0" if spec.scale.device == "cuda" else str(local[i]),
            "LOCAL_WORLD_SIZE": str(sum(1 for n, _ in slot.nodes if n == slot.nodes[i][0])),
            "MASTER_ADDR": slot.nodes[0][1],
            "MASTER_PORT": str(port),
        }
        refs.append(r.run.remote(spec, plan, env, slot.nodes[i][0], board))
    try:
        _follow(slot, refs, forward, keeper)
    except (ray.exceptions.RayError, AttemptFailed):
        raise
    except BaseException:
        _stop(slot, refs, plan["trial_id"], keeper)
        raise


def _follow(slot: Slot, refs: list, forward, keeper) -> None:
    """Wait for every rank at once, forwarding rank 0's reports and renewing the slot's lease;
    raise the first rank's failure, or AttemptFailed when the ranks have not all joined their
    group RENDEZVOUS_S after the start."""
    import ray

    start = renewed = time.monotonic()
    joined = False
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, timeout=POLL_S)
        for ref in done:
            ray.get(ref)  # a dead or failed rank raises here
        reports, joined_now = ray.get(slot.ranks[0].poll.remote())
        for m in reports:
            forward(m)
        joined = joined or joined_now
        now = time.monotonic()
        if not joined and pending and now - start > RENDEZVOUS_S:
            raise AttemptFailed(f"the trial's {len(refs)} ranks did not all join their group in {RENDEZVOUS_S:.0f} s")
        if now - renewed > RENEW_S:
            keeper.renew.remote(slot.key)
            renewed = now


def _stop(slot: Slot, refs: list, trial_id: str, keeper) -> None:
    """Tune ended the trainable while its ranks train: stop them at their next step (rank 0's stop
    vote) and lend the slot again, or discard it (kill its ranks) when they do not end within
    STOP_GRACE_S or fail. The lease is renewed meanwhile: the slot is still this trainable's."""
    import ray

    try:
        slot.ranks[0].stop.remote(trial_id)
        deadline = time.monotonic() + STOP_GRACE_S
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            keeper.renew.remote(slot.key)
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(RENEW_S, STOP_GRACE_S))
        if pending:
            raise TimeoutError(f"ranks still running {STOP_GRACE_S:.0f} s after a stop")
        ray.get(refs)  # a failed rank raises
    except BaseException:  # noqa: BLE001 - timed out, a rank failed, or this thread is ending too
        keeper.discard.remote(slot)
        return
    keeper.release.remote(slot)


def _local_ranks(nodes: list[str]) -> list[int]:
    """Each rank's index among the ranks on its node."""
    seen: dict[str, int] = {}
    out = []
    for n in nodes:
        out.append(seen.get(n, 0))
        seen[n] = out[-1] + 1
    return out
