"""A user metric: a function of one measured step's row (global sums, after the all-reduce)."""


def edge_of_stability(row: dict) -> dict:
    """lr · L_local / 2, where L_local = ‖g⁺ − g‖ / ‖Δ‖ (the row's smoothness_local): gradient
    descent on a quadratic is stable while this stays below 1 (Cohen et al. 2021,
    https://arxiv.org/abs/2103.00065). None where the step had no smoothness estimate."""
    lr, smooth = row.get("lr"), row.get("smoothness_local")
    return {"eos_ratio": None if lr is None or smooth is None else lr * smooth / 2}
