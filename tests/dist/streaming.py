"""A RecordingMeasurer (tests/dist/harness.py) that checks each step as it ends, for models too big
to keep every step's gathered tensors: benchmarks/bench_gpu.py's `check` mode (GPT-2 small)."""

from __future__ import annotations

from harness import RecordingMeasurer, check_step


class StreamingChecker(RecordingMeasurer):
    """RecordingMeasurer that checks each step as it ends (check_step) and then drops the full
    tensors no later check needs, keeping x_0 and the latest record only: for models whose
    gathered tensors cannot be kept for a whole run (GPT-2 small: 1 GB per float64 vector).
    Set ``case`` and ``spec`` on the class before the trial; ``errors`` holds the maxima."""

    case: dict = {}
    spec = None

    def __init__(self, engine, info, cfg, **kw):
        super().__init__(engine, info, cfg, **kw)
        self.errors: dict[str, float] = {}
        self.x0_full = None

    def _put(self, name: str, e: float) -> None:
        self.errors[name] = max(self.errors.get(name, 0.0), e)

    def end(self, step, loss_local, loss_fn, **kw):
        row = super().end(step, loss_local, loss_fn, **kw)
        rec = self.log[-1]
        if self.x0_full is None:
            self.x0_full = rec["x"]
        prev = self.log[-2] if len(self.log) > 1 else None
        self._put("probe_state_diffs", float(len(rec.get("probe_state_diff", []))))
        check_step(self.case, self.spec, len(self.log) - 1, rec, prev, self.x0_full, self._put)
        if prev is not None:
            self.log[-2] = {"row": prev["row"], "train_loss": prev["train_loss"]}
        return row
