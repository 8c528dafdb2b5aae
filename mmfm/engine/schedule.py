"""Learning-rate schedule (linear warm-up, cosine decay) and the deterministic task-stream schedule."""

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, progress_floor: float = 0.0) -> float:
    """Multiplier of the base lr at ``step``. ``progress_floor`` lets a wall-time budget end the cosine early."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(progress, progress_floor))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def stream_schedule(weights: dict[str, float], num_steps: int) -> list[str]:
    """Smooth weighted round-robin: which stream each step trains on; a pure function of the weights.

    Streams are interleaved as evenly as their weights allow (weights 2:1 give a a b a a b ...), so a
    resumed run recomputes exactly which stream every past step used.
    """
    names = sorted(w for w in weights if weights[w] > 0)
    if not names:
        raise ValueError("train.tasks has no stream with a positive weight")
    total = sum(weights[n] for n in names)
    current = {n: 0.0 for n in names}
    order = []
    for _ in range(num_steps):
        for n in names:
            current[n] += weights[n]
        chosen = max(names, key=lambda n: current[n])
        current[chosen] -= total
        order.append(chosen)
    return order
