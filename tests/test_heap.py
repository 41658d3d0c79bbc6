"""pyvlm.heap: a serving process freezes its start-up heap and collects
the young generation less often; restore() gives both back."""

import gc

from pyvlm.heap import GEN0_THRESHOLD, tune_for_serving


def test_tune_for_serving_freezes_and_restore_undoes_it():
    before = gc.get_threshold()
    survivor = [object()]  # alive across the freeze: frozen with it
    restore = tune_for_serving()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, *before[1:])
        assert not any(o is survivor for o in gc.get_objects())  # out of the collector's reach
    finally:
        restore()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
    assert any(o is survivor for o in gc.get_objects())
