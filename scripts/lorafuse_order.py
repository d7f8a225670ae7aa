"""lorafuse's deterministic training order, for the Python PEFT reference script.

Bit-exact twin of ``lorafuse::train::data::shuffled_order`` (src/train/data.rs):

* a SplitMix64 generator seeded with ``seed ^ (epoch * 0x9E3779B97F4A7C15)`` (mod 2**64);
* a Fisher-Yates shuffle of ``[0, 1, ..., n-1]``: for ``i`` from ``n-1`` down to 1,
  ``j = next() % (i + 1)``, swap positions ``i`` and ``j``.

Usage::

    from lorafuse_order import shuffled_order
    for epoch in range(epochs):
        for idx in shuffled_order(len(train), seed, epoch):
            ...

``python3 scripts/lorafuse_order.py`` runs the self-check: the same values that
``tests/data.rs`` asserts for the Rust function.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


class SplitMix64:
    """SplitMix64 (Steele, Lea & Flood 2014; Vigna's splitmix64.c), arithmetic mod 2**64."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of ``range(n)`` that lorafuse trains epoch ``epoch`` in (seed, epoch: u64)."""
    if n < 0 or not 0 <= seed <= MASK64 or not 0 <= epoch <= MASK64:
        raise ValueError("n must be >= 0; seed and epoch must be u64 values")
    rng = SplitMix64(seed ^ ((epoch * GAMMA) & MASK64))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


# The values tests/data.rs asserts for the Rust implementation (computed once in Rust).
EXPECTED_N10_SEED42_EPOCH0 = [0, 9, 5, 8, 6, 4, 7, 2, 1, 3]
EXPECTED_N10_SEED42_EPOCH1 = [2, 3, 9, 7, 5, 8, 6, 4, 0, 1]
# SplitMix64 seeded with 0: the first outputs of Vigna's reference splitmix64.c.
EXPECTED_SPLITMIX64_SEED0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
# (n, seed, epoch) -> (first 8 entries, sum over i of (i + 1) * order[i]).
EXPECTED_CHECKSUMS = {
    (914, 1234, 2): ([481, 668, 46, 587, 428, 901, 283, 318], 187553019),
    (1015, MASK64, 7): ([836, 485, 672, 127, 217, 124, 911, 745], 256119015),
}


def self_check() -> None:
    """Asserts the same values as the Rust test ``shuffled_order_matches_python_reference``."""
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(3)] == EXPECTED_SPLITMIX64_SEED0
    assert shuffled_order(10, 42, 0) == EXPECTED_N10_SEED42_EPOCH0, shuffled_order(10, 42, 0)
    assert shuffled_order(10, 42, 1) == EXPECTED_N10_SEED42_EPOCH1, shuffled_order(10, 42, 1)
    for (n, seed, epoch), (head, checksum) in EXPECTED_CHECKSUMS.items():
        order = shuffled_order(n, seed, epoch)
        assert sorted(order) == list(range(n))
        assert order[:8] == head, (n, seed, epoch, order[:8])
        assert sum((i + 1) * v for i, v in enumerate(order)) == checksum
    assert shuffled_order(0, 1, 2) == [] and shuffled_order(1, 1, 2) == [0]


if __name__ == "__main__":
    self_check()
    print("lorafuse_order self-check OK:", shuffled_order(10, 42, 0))
