"""The retrain lr schedules give the expected lr at chosen epochs, through MXNet's 1-based update count."""

import math
import pickle
from types import SimpleNamespace

import mxnet as mx
import pytest

from dsonas.errors import ConfigError
from dsonas.schedule import SGDRScheduler, make_schedule

IPE = 100  # iterations per epoch


def cfg(**kw):
    base = dict(schedule="cosine_restarts", lr_max=0.05, lr_min=0.001, t0=10, tmul=2, epochs=40)
    base.update(kw)
    return SimpleNamespace(**base)


def lr_at(sched, epoch):
    """lr of the step taken at fractional `epoch` (MXNet passes num_update = steps done + 1)."""
    return sched(int(round(epoch * IPE)) + 1)


def test_sgdr_restarts_and_midpoints():
    s = make_schedule(cfg(), IPE)
    assert isinstance(s, SGDRScheduler)
    mid = 0.001 + 0.5 * (0.05 - 0.001)
    assert lr_at(s, 0) == pytest.approx(0.05)
    assert lr_at(s, 5) == pytest.approx(mid)
    assert lr_at(s, 9.99) == pytest.approx(0.001, abs=1e-5)
    assert lr_at(s, 10) == pytest.approx(0.05)      # first restart
    assert lr_at(s, 20) == pytest.approx(mid)       # middle of the 20-epoch cycle
    assert lr_at(s, 29.99) == pytest.approx(0.001, abs=1e-5)
    assert lr_at(s, 30) == pytest.approx(0.05)      # second restart, cycle of 40
    assert lr_at(s, 50) == pytest.approx(mid)
    # Inside an epoch the lr moves per iteration, not per epoch.
    assert lr_at(s, 0.5) < lr_at(s, 0)


def test_sgdr_tmul_one_is_periodic():
    s = make_schedule(cfg(tmul=1, t0=4), IPE)
    for e in (0, 1, 2.5, 3.9):
        assert lr_at(s, e) == pytest.approx(lr_at(s, e + 8))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_start_middle_end(schedule):
    s = make_schedule(cfg(schedule=schedule, lr_max=0.5, lr_min=0.0, epochs=10), IPE)
    last = 10 * IPE  # num_update of the final step
    assert s(1) == pytest.approx(0.5)
    assert s(last) == pytest.approx(0.0, abs=1e-12)
    middle = s((last + 1) // 2)
    assert middle == pytest.approx(0.25, rel=1e-2)
    if schedule == "linear":
        assert lr_at(s, 2.5) == pytest.approx(0.5 * (1 - 250 / (last - 1)))
    else:
        assert lr_at(s, 2.5) == pytest.approx(0.25 * (1 + math.cos(math.pi * 250 / (last - 1))))


def test_constant_and_unknown():
    s = make_schedule(cfg(schedule="constant"), IPE)
    assert {s(1), s(500), s(10**6)} == {0.05}
    with pytest.raises(ConfigError, match="retrain.schedule"):
        make_schedule(cfg(schedule="step"), IPE)


def test_one_iteration_run_does_not_divide_by_zero():
    assert make_schedule(cfg(schedule="linear", epochs=1), 1)(1) == pytest.approx(0.05)


def test_trainer_sees_schedule_and_it_survives_pickling():
    """Through gluon.Trainer the first step uses lr_max; a pickled copy (as in save_states) continues."""
    p = mx.gluon.Parameter("w", shape=(2,))
    p.initialize()
    sched = make_schedule(cfg(), 3)
    trainer = mx.gluon.Trainer([p], "nag", {"lr_scheduler": sched, "momentum": 0.9})
    seen = []
    for _ in range(4):
        with mx.autograd.record():
            loss = (p.data() ** 2).sum()
        loss.backward()
        trainer.step(1)
        seen.append(trainer.learning_rate)
    # After step k, trainer.learning_rate is the lr step k used: step 1 ran at lr_max.
    assert seen == [sched.lr_at(k / 3) for k in range(4)]
    assert seen[0] == pytest.approx(0.05) and seen[3] < seen[0]
    copy = pickle.loads(pickle.dumps(sched))
    assert [copy(k) for k in range(1, 50)] == [sched(k) for k in range(1, 50)]
