"""Small statistics helpers."""


def mean(values: list[float]) -> float:
    """Arithmetic mean; raises ValueError for an empty list."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)
