"""Hyperparameter search domains and the deterministic expansion of a space into trials.

In YAML a hyperparameter is either a fixed scalar (`momentum: 0.9`) or a one-key mapping naming
its domain: `{choice: [...]}`, `{grid: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`,
`{int: [lo, hi]}` (integers lo..hi, both included). For random and quasirandom search the study
expands every optimizer's space itself, seeded by `search.seed`, so that trial ids and
hyperparameters are known (and stored) before anything runs and a resumed study reuses them;
TPE (opt_study.plan.tpe) proposes them online instead.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

SCALAR = (bool, int, float, str)
SAMPLED = ("choice", "uniform", "loguniform", "int")  # domains a search draws from (grid is crossed)
MAX_VALUES = 10_000  # values in one choice/grid list
MAX_INT = 2**62  # larger integers are absurd as hyperparameters (and overflow float())


@dataclass(frozen=True)
class Domain:
    kind: str  # fixed | choice | grid | uniform | loguniform | int
    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return rng.choice(self.values)
        lo, hi = self.values
        if self.kind == "int":
            return rng.randint(lo, hi)
        if self.kind == "uniform":
            return rng.uniform(lo, hi)
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))  # loguniform

    def describe(self) -> str:
        return str(self.values[0]) if self.kind == "fixed" else f"{self.kind}{list(self.values)}"


def parse_domain(raw: Any, field: str) -> Domain:
    """YAML value -> Domain; raises ValueError('<field>: ...') on anything else.

    Every value must be a usable scalar: NaN, infinities and integers beyond MAX_INT are refused
    here, so that nothing downstream (float(), math.isfinite) overflows on a hostile file.
    """
    if isinstance(raw, SCALAR):
        _check_scalar(raw, field)
        return Domain("fixed", (raw,))
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ValueError(
            f"{field}: a hyperparameter is a scalar or one of {{choice: [..]}}, {{grid: [..]}}, "
            "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]}"
        )
    ((kind, vals),) = raw.items()
    where = f"{field}.{kind}"
    if kind in ("choice", "grid"):
        if not isinstance(vals, list) or not vals or not all(isinstance(v, SCALAR) for v in vals):
            raise ValueError(f"{where}: must be a non-empty list of scalars")
        if len(vals) > MAX_VALUES:
            raise ValueError(f"{where}: at most {MAX_VALUES} values, got {len(vals)}")
        for v in vals:
            _check_scalar(v, where)
        if kind == "grid" and len(set(map(_key, vals))) != len(vals):
            raise ValueError(f"{where}: grid values must be distinct (a repeat is a duplicate trial)")
        return Domain(kind, tuple(vals))
    if kind in ("uniform", "loguniform"):
        ok = isinstance(vals, list) and len(vals) == 2 and all(_finite_number(v) for v in vals)
        if not ok or not vals[0] < vals[1]:
            raise ValueError(f"{where}: must be [lo, hi] with finite numbers lo < hi")
        if kind == "loguniform" and vals[0] <= 0:
            raise ValueError(f"{where}: lo must be > 0")
        return Domain(kind, (float(vals[0]), float(vals[1])))
    if kind == "int":
        ok = isinstance(vals, list) and len(vals) == 2 and all(_finite_number(v) and isinstance(v, int) for v in vals)
        if not ok or not vals[0] < vals[1]:
            raise ValueError(f"{where}: must be [lo, hi] with integers lo < hi")
        return Domain(kind, (vals[0], vals[1]))
    raise ValueError(f"{field}: unknown domain {str(kind)[:40]!r} (allowed: choice, grid, uniform, loguniform, int)")


def _finite_number(v: Any) -> bool:
    """A real number (not a bool) that is finite as a float; a huge int is not (float() overflows)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        return abs(v) <= MAX_INT
    return math.isfinite(v)


def _check_scalar(v: Any, field: str) -> None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite_number(v):
        raise ValueError(f"{field}: must be a finite number of sane size, got {str(v)[:40]}")


def _key(v: Any) -> tuple:
    """Equality key that keeps True, 1 and 1.0 apart (Python's == would merge them)."""
    return (type(v).__name__, v)


def expand(space: Mapping[str, Domain], samples: int, rng: random.Random) -> list[dict[str, Any]]:
    """Every grid point x `samples` random draws of the sampled dimensions (Tune's semantics).

    Draws are made in sorted key order from `rng`, so the expansion is a pure function of the
    space and the seed.
    """
    keys = sorted(space)
    grid_keys = [k for k in keys if space[k].kind == "grid"]
    grids = itertools.product(*(space[k].values for k in grid_keys)) if grid_keys else [()]
    out = []
    for point in grids:
        for _ in range(samples):
            cfg = {k: space[k].sample(rng) for k in keys if space[k].kind != "grid"}
            cfg.update(zip(grid_keys, point))
            out.append({k: cfg[k] for k in keys})
    return out


def budget(space: Mapping[str, Domain], samples: int) -> int:
    """Number of configurations `expand` yields (grid size x samples)."""
    n = samples
    for d in space.values():
        if d.kind == "grid":
            n *= len(d.values)
    return n


def dedupe(configs: Sequence[dict]) -> bool:
    """True when all configurations are distinct (a sampled space can repeat a choice)."""
    return len({tuple(sorted(c.items())) for c in configs}) == len(configs)


# ------------------------------------------------------------------------- quasi-random search
def quasirandom_points(dims: int, n: int, seed: int) -> list[list[float]]:
    """The first `n` points of a scrambled Sobol sequence in [0, 1)^dims, seeded by `seed`.

    A prefix of one Sobol sequence, so the first k of n points are exactly the k points planned
    alone (nested budgets stay nested). Drawn as the next power of two and cut: scipy warns
    when a draw is not one, and a Sobol prefix is what nesting needs anyway.
    """
    from scipy.stats import qmc

    if dims == 0:
        return [[] for _ in range(n)]
    m = max(0, math.ceil(math.log2(n))) if n > 0 else 0
    pts = qmc.Sobol(d=dims, scramble=True, seed=seed).random_base2(m)
    return [list(map(float, p)) for p in pts[:n]]


def map_unit(domain: Domain, u: float) -> Any:
    """A point u in [0, 1) of the unit interval -> a value of the sampled `domain`.

    uniform: affine; loguniform: affine in log space; choice and int: k equal bins of [0, 1).
    """
    if domain.kind == "choice":
        k = len(domain.values)
        return domain.values[min(int(u * k), k - 1)]
    lo, hi = domain.values
    if domain.kind == "int":
        return lo + min(int(u * (hi - lo + 1)), hi - lo)
    if domain.kind == "uniform":
        return lo + u * (hi - lo)
    if domain.kind == "loguniform":
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    raise ValueError(f"{domain.kind} is not a sampled domain")


def expand_quasirandom(space: Mapping[str, Domain], samples: int, seed: int) -> list[dict[str, Any]]:
    """Every grid point x the first `samples` scrambled-Sobol points of the sampled dimensions.

    Quasi-random search as in AlgoPerf's external tuning ruleset (Dahl et al. 2023,
    "Benchmarking Neural Network Training Algorithms", https://arxiv.org/abs/2306.07179, after
    Bousquet et al. 2017): low-discrepancy points cover the space more evenly than random draws
    at the same budget. One Sobol dimension per sampled key in sorted order; every grid point
    reuses the same points (the grid is a crossed factor). A pure function of (space, seed).
    """
    keys = sorted(space)
    sampled = [k for k in keys if space[k].kind in SAMPLED]
    grid_keys = [k for k in keys if space[k].kind == "grid"]
    points = quasirandom_points(len(sampled), samples, seed)
    grids = itertools.product(*(space[k].values for k in grid_keys)) if grid_keys else [()]
    out = []
    for gp in grids:
        for u in points:
            cfg = {k: space[k].values[0] for k in keys if space[k].kind == "fixed"}
            cfg.update({k: map_unit(space[k], x) for k, x in zip(sampled, u)})
            cfg.update(zip(grid_keys, gp))
            out.append({k: cfg[k] for k in keys})
    return out


def seed_of(*parts: Any) -> int:
    """A stable 63-bit seed from the parts (random.Random hashes a str seed with SHA-512,
    so it is the same in every process, unlike hash())."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)
