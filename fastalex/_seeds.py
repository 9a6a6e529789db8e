"""The seeds a run derives from its one seed: data order, each item's draws, dropout per rank.

Reduced modulo 2**63 so that any seed --seed accepts ([0, 2**63)) stays a valid torch seed; for
seeds below ~9e5 the values are those of the plain formulas (the modulo changes nothing there).
"""

_MOD = 1 << 63


def order_seed(seed: int, epoch: int) -> int:
    """The epoch's shuffle of the training set."""
    return (seed * 7919 + epoch) % _MOD


def item_seed(seed: int, epoch: int, index: int) -> int:
    """One item's augmentation draws in an epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % _MOD


def rank_seed(seed: int, rank: int) -> int:
    """Dropout's stream on one rank (torch's global RNG)."""
    return ((seed * 1_000_003 + rank) * 7919 + 17) % _MOD
