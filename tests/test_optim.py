"""APG-NAG (dsonas.optim) against Eq. 6-8 by hand, through a real gluon.Trainer, and on a lasso problem."""

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from dsonas.optim import APGNAG, soft_threshold


def np_apgnag(lam, grads, lr, mu, gamma):
    """Eq. 6-8 + clip at 0, written out with numpy, one step per gradient."""
    v = np.zeros_like(lam)
    for g in grads:
        z = lam - lr * g
        s = np.sign(z) * np.maximum(np.abs(z) - lr * gamma, 0.0)
        v = s - lam + mu * v
        lam = np.maximum(s + mu * v, 0.0)
    return lam, v


def make_param(value, name="lam"):
    param = gluon.Parameter(name, shape=np.shape(value), init=mx.init.Constant(0))
    param.initialize(ctx=mx.cpu())
    param.set_data(mx.nd.array(value))
    return param


def set_grad(param, grad):
    """Give the parameter exactly this gradient, by backprop of the linear loss sum(grad * param)."""
    with autograd.record():
        loss = mx.nd.sum(param.data() * mx.nd.array(grad))
    loss.backward()


def trainer_step(trainer, param, grad):
    set_grad(param, grad)
    trainer.step(1)


def test_soft_threshold_exact_zeros_numpy_and_ndarray():
    z = np.array([-2.0, -0.5, -0.1, 0.0, 0.1, 0.5, 2.0], dtype=np.float32)
    expected = np.array([-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5], dtype=np.float32)
    np.testing.assert_array_equal(soft_threshold(z, 0.5), expected)
    np.testing.assert_array_equal(soft_threshold(mx.nd.array(z), 0.5).asnumpy(), expected)
    alpha = np.array([0.0, 0.0, 0.2, 0.0, 0.05, 1.0, 3.0], dtype=np.float32)
    got = soft_threshold(mx.nd.array(z), mx.nd.array(alpha)).asnumpy()
    np.testing.assert_allclose(got, [-2.0, -0.5, 0.0, 0.0, 0.05, 0.0, 0.0], atol=1e-7)
    assert np.count_nonzero(got == 0.0) == 4


def test_registered_and_created_by_name():
    opt = mx.optimizer.create("apgnag", learning_rate=0.3, momentum=0.5, gamma=0.2)
    assert isinstance(opt, APGNAG) and opt.aggregate_num == 0


def test_three_steps_match_equations_through_trainer():
    lam0 = np.array([1.0, 0.3, 0.05, 0.8, 0.02], dtype=np.float32)
    grads = [np.array([0.5, -0.2, 0.1, -1.0, 0.0], dtype=np.float32),
             np.array([0.1, 0.4, -0.3, 0.2, -0.05], dtype=np.float32),
             np.array([-0.6, 0.1, 0.0, 0.3, 0.2], dtype=np.float32)]
    param = make_param(lam0)
    trainer = gluon.Trainer([param], "apgnag", {"learning_rate": 0.1, "momentum": 0.9, "gamma": 0.5})
    for step, g in enumerate(grads, 1):
        trainer_step(trainer, param, g)
        lam, v = np_apgnag(lam0, grads[:step], lr=0.1, mu=0.9, gamma=0.5)
        np.testing.assert_allclose(param.data().asnumpy(), lam, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(trainer._updaters[0].states[0].asnumpy(), v, rtol=1e-6, atol=1e-7)
    assert np.any(param.data().asnumpy() == 0.0) and np.any(param.data().asnumpy() != lam0)
    assert np.all(param.data().asnumpy() >= 0.0)


def test_zero_gamma_is_mxnet_nag():
    rng = np.random.default_rng(0)
    w0 = rng.uniform(1, 2, size=6).astype(np.float32)  # stays positive: no clipping involved
    grads = [rng.normal(size=6).astype(np.float32) * 0.1 for _ in range(4)]
    ours, ref = make_param(w0, "a"), make_param(w0, "b")
    t_ours = gluon.Trainer([ours], "apgnag", {"learning_rate": 0.2, "momentum": 0.9})
    t_ref = gluon.Trainer([ref], "nag", {"learning_rate": 0.2, "momentum": 0.9})
    for g in grads:
        trainer_step(t_ours, ours, g)
        trainer_step(t_ref, ref, g)
    np.testing.assert_allclose(ours.data().asnumpy(), ref.data().asnumpy(), rtol=1e-5)


def test_rescale_clip_lr_mult_and_no_weight_decay():
    lam0 = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    param = make_param(lam0)
    param.lr_mult = 0.5
    trainer = gluon.Trainer([param], "apgnag", {"learning_rate": 0.2, "momentum": 0.0, "wd": 10.0,
                                                "clip_gradient": 1.0})
    set_grad(param, [8.0, 1.0, -20.0])
    trainer.step(4)  # rescale_grad = 1/4 -> [2, 0.25, -5] -> clipped to [1, 0.25, -1]
    np.testing.assert_allclose(param.data().asnumpy(), lam0 - 0.1 * np.array([1.0, 0.25, -1.0]), rtol=1e-6)


def test_per_element_gamma_by_name_and_index():
    lam0 = np.full(4, 0.5, dtype=np.float32)
    params = [make_param(lam0, "first"), make_param(lam0, "second")]
    opt = APGNAG(learning_rate=0.1, momentum=0.0, gamma=1.0)
    trainer = gluon.Trainer(params, opt)
    per_elem = np.array([0.0, 1.0, 5.0, 10.0], dtype=np.float32)
    opt.set_gamma("second", mx.nd.array(per_elem))
    assert opt.gamma_of(1) is not None and np.array_equal(opt.gamma_of(1), per_elem)
    opt.set_gamma(0, 2.0)
    for p in params:
        set_grad(p, np.zeros(4))
    trainer.step(1)
    np.testing.assert_allclose(params[0].data().asnumpy(), np.full(4, 0.5 - 0.1 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(params[1].data().asnumpy(), [0.5, 0.4, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        opt.set_gamma(1, np.ones(3))
    with pytest.raises(KeyError):
        opt.set_gamma("missing", 1.0)


def test_frozen_entries_stay_exactly_zero():
    param = make_param(np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32))
    opt = APGNAG(learning_rate=0.5, momentum=0.9, gamma=0.0)
    trainer = gluon.Trainer([param], opt)
    trainer_step(trainer, param, [-1.0, -1.0, 1.0, 1.0])  # builds momentum on every entry
    opt.set_frozen(0, np.array([False, True, False, True]))
    for _ in range(3):
        trainer_step(trainer, param, [-1.0, -1.0, -1.0, -1.0])  # gradient pushes every λ up
        lam = param.data().asnumpy()
        assert lam[1] == 0.0 and lam[3] == 0.0 and lam[0] > 0.9 and lam[2] > 0.0
        mom = trainer._updaters[0].states[0].asnumpy()
        assert mom[1] == 0.0 and mom[3] == 0.0


def test_save_load_states_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    lam0 = rng.uniform(0, 1, size=8).astype(np.float32)
    grads = [rng.normal(size=8).astype(np.float32) for _ in range(6)]
    gamma = rng.uniform(0, 2, size=8).astype(np.float32)
    frozen = np.arange(8) % 3 == 0

    def fresh(value):
        param = make_param(value)
        opt = APGNAG(learning_rate=0.05, momentum=0.9, gamma=0.1)
        opt.set_gamma("lam", gamma)
        opt.set_frozen("lam", frozen)
        return param, gluon.Trainer([param], opt)

    param, trainer = fresh(lam0)
    for g in grads[:3]:
        trainer_step(trainer, param, g)
    trainer.save_states(str(tmp_path / "apg.states"))
    mid = param.data().asnumpy()
    for g in grads[3:]:
        trainer_step(trainer, param, g)

    resumed, trainer2 = fresh(np.zeros(8, dtype=np.float32))
    resumed.set_data(mx.nd.array(mid))
    trainer2.load_states(str(tmp_path / "apg.states"))
    assert isinstance(trainer2._optimizer, APGNAG) and trainer2._optimizer.num_update == 3
    for g in grads[3:]:
        trainer_step(trainer2, resumed, g)
    np.testing.assert_array_equal(resumed.data().asnumpy(), param.data().asnumpy())
    assert np.all(resumed.data().asnumpy()[frozen] == 0.0)


def test_lasso_recovers_true_support():
    """min 1/(2n)‖Xβ − y‖² + γ‖β‖₁, β >= 0: APG-NAG through a Trainer finds the 5 true non-zeros."""
    rng = np.random.default_rng(0)
    n, d = 200, 50
    support = np.array([3, 11, 20, 34, 47])
    beta = np.zeros(d, dtype=np.float32)
    beta[support] = rng.uniform(1.0, 2.0, size=support.size)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = x @ beta + 0.05 * rng.normal(size=n).astype(np.float32)
    xs, ys = mx.nd.array(x), mx.nd.array(y)

    param = make_param(np.full(d, 0.5, dtype=np.float32), "beta")
    trainer = gluon.Trainer([param], "apgnag", {"learning_rate": 0.1, "momentum": 0.9, "gamma": 0.1})
    for _ in range(300):
        with autograd.record():
            loss = 0.5 * mx.nd.mean(mx.nd.square(mx.nd.dot(xs, param.data()) - ys))
        loss.backward()
        trainer.step(1)
    est = param.data().asnumpy()
    assert set(np.flatnonzero(est)) == set(support)
    np.testing.assert_allclose(est[support], beta[support], atol=0.2)


@pytest.mark.parametrize("update_on_kvstore", [False, True])
def test_two_contexts_match_one(update_on_kvstore):
    """Data-parallel λ steps (kvstore 'device', updates on the kvstore or per device) equal one device."""
    grad = np.array([0.5, 2.0, -1.0, 3.0], dtype=np.float32)
    gamma = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    single = make_param(np.ones(4, dtype=np.float32), "lam")
    opt = APGNAG(learning_rate=0.1, momentum=0.9, gamma=1.0)
    trainer = gluon.Trainer([single], opt)
    opt.set_gamma("lam", gamma)

    ctxs = [mx.cpu(0), mx.cpu(1)]
    multi = gluon.Parameter("lam", shape=(4,), init=mx.init.One())
    multi.initialize(ctx=ctxs)
    opt2 = APGNAG(learning_rate=0.1, momentum=0.9, gamma=1.0)
    trainer2 = gluon.Trainer([multi], opt2, kvstore="device", update_on_kvstore=update_on_kvstore)
    opt2.set_gamma("lam", gamma)
    for _ in range(3):
        trainer_step(trainer, single, grad)
        with autograd.record():
            losses = [mx.nd.sum(multi.data(c) * mx.nd.array(grad, ctx=c)) for c in ctxs]
        autograd.backward(losses)
        trainer2.step(2)
    for c in ctxs:
        np.testing.assert_allclose(multi.data(c).asnumpy(), single.data().asnumpy(), rtol=1e-6)
