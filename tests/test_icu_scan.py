"""The cycle loop's scan for the next due queue: its scalar, AVX2 and AVX-512 variants (the host's best
runs in the engine) against a plain loop."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lpucore import _engine


@settings(max_examples=60)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=40), st.data())
def test_every_scan_for_due_queues_agrees(qn, data):
    """The first queue from q0 whose next issue is c (len(qn) if none), and the least next issue among
    the queues passed over (from nmin down)."""
    q0 = data.draw(st.integers(0, len(qn)))
    c = data.draw(st.integers(0, 12))
    nmin = data.draw(st.integers(0, 14))
    want_q, want_min = len(qn), nmin
    for q in range(q0, len(qn)):
        if qn[q] == c:
            want_q = q
            break
        want_min = min(want_min, qn[q])
    ran = 0
    for variant in (0, 1, 2):
        got = _engine._next_due(np.array(qn, np.int64), q0, c, nmin, variant)
        if got is not None:
            ran += 1
            assert got == (want_q, want_min), variant
    assert ran >= 1


def test_a_long_queue_list_with_the_due_queue_in_every_place():
    """144 queues (a GroqChip's): the due queue in each group of eight and four, and none."""
    for due in list(range(144)) + [None]:
        qn = np.arange(1000, 1144, dtype=np.int64)
        if due is not None:
            qn[due] = 5
        for variant in (0, 1, 2):
            got = _engine._next_due(qn, 0, 5, 10 ** 9, variant)
            if got is not None:
                passed = qn[:due] if due is not None else qn
                assert got == (144 if due is None else due, min([10 ** 9, *passed.tolist()])), (variant, due)
