"""APG-NAG: the proximal Nesterov optimizer that makes the structure parameters λ exactly sparse.

DSO-NAS (Eq. 6-8, after Sparse Structure Selection) minimises  G(λ) + γ‖λ‖₁  with

    z = λ − η ∇G(λ)
    v = S_ηγ(z) − λ + μ v
    λ = S_ηγ(z) + μ v

where S_α(z) = sign(z)·max(|z| − α, 0) is the soft threshold, the proximal map of α‖·‖₁. Unlike a
subgradient step on the L1 term, the soft threshold lands on exact zeros, which is what lets `derive`
drop edges with `λ == 0`. With γ = 0 the update is Nesterov momentum (MXNet's `nag` without weight decay).

Choices beyond the equations, and why:

* λ is clipped at 0 after every update: a λ is a scale on an edge, a negative one would just flip the sign
  of a feature map that the following BatchNorm can flip back, so the search space is λ ≥ 0.
* No weight decay (`wd`/`wd_mult` are ignored): the L1 term *is* λ's regulariser; an extra L2 pull would
  shrink λ without ever producing the exact zeros the method relies on.
* γ is per parameter and may be per element (`set_gamma`): the budget-aware penalties (Eq. 9-10) give
  every block or every op its own γ. `set_frozen` pins pruned entries at exactly 0 so an edge removed by
  shrinking cannot come back through momentum or a stray gradient.
* Subclasses `mx.optimizer.Optimizer` directly with `aggregate_num = 0`: a `gluon.Trainer` hands an SGD
  subclass *tuples* of indices (aggregated updates) and never calls its per-parameter `update`.

Saving and loading: `Trainer.save_states` pickles this optimizer (γ and frozen masks included, as numpy
arrays) together with the momenta, and `Trainer.load_states` *replaces* the trainer's optimizer object by
the unpickled copy. After a load, fetch the live optimizer again (`trainer._optimizer`, MXNet 1.x has no
public accessor) before calling `set_gamma`/`set_frozen`, or the calls go to the stale object.
"""

import mxnet as mx
import numpy as np


def soft_threshold(z, alpha):
    """S_α(z) = sign(z)·max(|z| − α, 0) for numpy arrays or NDArrays.

    `alpha` is a scalar or an array of z's shape (elementwise thresholds). Entries with |z| <= α become
    exactly 0, the property the whole method depends on.
    """
    if isinstance(z, mx.nd.NDArray):
        return mx.nd.sign(z) * mx.nd.maximum(mx.nd.abs(z) - alpha, 0.0)
    z = np.asarray(z)
    return np.sign(z) * np.maximum(np.abs(z) - alpha, 0.0)


@mx.optimizer.register
class APGNAG(mx.optimizer.Optimizer):
    """Accelerated proximal gradient with Nesterov momentum for λ (DSO-NAS Eq. 6-8), registered "apgnag".

    Parameters
    ----------
    momentum : float
        μ in Eq. 7-8.
    gamma : float
        Default L1 strength γ for every parameter without its own `set_gamma`.
    **kwargs
        Passed to `mx.optimizer.Optimizer`: learning_rate / lr_scheduler (η), rescale_grad, clip_gradient
        are honoured, lr_mult too; wd and wd_mult are ignored (see the module docstring).
    """

    def __init__(self, momentum=0.9, gamma=0.0, **kwargs):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.gamma = float(gamma)
        # Per-element update below; aggregated (tuple-of-indices) calls would bypass it.
        self.aggregate_num = 0
        self._gammas = {}  # index (or not-yet-resolvable name) -> float or np.ndarray
        self._frozen = {}  # index (or name) -> np.ndarray of bool, True = pinned at 0
        self._device_copies = {}  # (kind, key, context) -> NDArray; rebuilt on demand, never pickled

    # -- per-parameter settings ---------------------------------------------------------------------

    def set_gamma(self, index_or_name, value):
        """Give one parameter its own γ: a float, or an array (numpy or NDArray) of the parameter's shape."""
        key = self._resolve(index_or_name)
        if isinstance(value, (int, float, np.floating, np.integer)):
            self._gammas[key] = float(value)
        else:
            arr = value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)
            if np.any(arr < 0):
                raise ValueError(f"gamma for {index_or_name!r} has negative entries; γ must be >= 0")
            self._check_shape(key, arr.shape, "gamma")
            self._gammas[key] = arr.astype(np.float32)
        self._forget_copies("gamma", key)

    def set_frozen(self, index_or_name, mask):
        """Pin the entries where `mask` is True at exactly 0 (λ and momentum), on this and every later update.

        Setting a new mask replaces the old one (so it can also unfreeze); the entries are zeroed at the end
        of each update, whatever the gradient and momentum say.
        """
        key = self._resolve(index_or_name)
        arr = mask.asnumpy() if isinstance(mask, mx.nd.NDArray) else np.asarray(mask)
        arr = arr.astype(bool)
        self._check_shape(key, arr.shape, "frozen mask")
        self._frozen[key] = arr
        self._forget_copies("keep", key)

    def gamma_of(self, index_or_name):
        """The γ (float or numpy array) the next update of this parameter will use."""
        key = self._resolve(index_or_name)
        return self._lookup(self._gammas, key, self.gamma)

    def _resolve(self, index_or_name):
        """Parameter index for a name (via the Trainer's param_dict or idx2name); the name itself if unknown.

        An unresolved name is kept and matched at update time, so settings may be made before the optimizer
        is given to a Trainer.
        """
        if not isinstance(index_or_name, str):
            return int(index_or_name)
        for index, param in self.param_dict.items():
            if param.name == index_or_name:
                return index
        for index, name in self.idx2name.items():
            if name == index_or_name:
                return index
        if self.param_dict:
            raise KeyError(f"no parameter named {index_or_name!r} in this optimizer's trainer")
        return index_or_name

    def _name_of(self, index):
        if index in self.param_dict:
            return self.param_dict[index].name
        return self.idx2name.get(index)

    def _lookup(self, table, index, default):
        if index in table:
            return table[index]
        return table.get(self._name_of(index), default)

    def _check_shape(self, key, shape, what):
        param = self.param_dict.get(key) if isinstance(key, int) else None
        if param is not None and param.shape is not None and tuple(param.shape) != tuple(shape):
            raise ValueError(f"{what} of shape {tuple(shape)} for parameter {param.name!r} "
                             f"of shape {tuple(param.shape)}")

    def _forget_copies(self, kind, key):
        for cached in [k for k in self._device_copies if k[:2] == (kind, key)]:
            del self._device_copies[cached]

    def _on_device(self, kind, key, value, like):
        """NDArray copy of a per-element setting on the weight's context, cached until the setting changes."""
        if value.shape != like.shape:
            raise ValueError(f"{kind} of shape {value.shape} for a parameter of shape {like.shape}")
        cache_key = (kind, key, like.context)
        if cache_key not in self._device_copies:
            self._device_copies[cache_key] = mx.nd.array(value, ctx=like.context, dtype=like.dtype)
        return self._device_copies[cache_key]

    # -- the update ---------------------------------------------------------------------------------

    def create_state(self, index, weight):
        """The momentum v of Eq. 7, zero at start."""
        return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def update(self, index, weight, grad, state):
        if isinstance(index, (list, tuple)):
            for i, w, g, s in zip(index, weight, grad, state, strict=True):
                self.update(i, w, g, s)
            return
        self._update_count(index)
        lr = self._get_lr(index)
        grad = grad * self.rescale_grad
        if self.clip_gradient is not None:
            grad = mx.nd.clip(grad, -self.clip_gradient, self.clip_gradient)

        gamma = self._lookup(self._gammas, index, self.gamma)
        if isinstance(gamma, np.ndarray):
            gamma = self._on_device("gamma", self._key_for(self._gammas, index), gamma, weight)

        z = weight - lr * grad                                   # Eq. 6
        shrunk = soft_threshold(z, lr * gamma)
        state[:] = shrunk - weight + self.momentum * state       # Eq. 7
        weight[:] = mx.nd.relu(shrunk + self.momentum * state)   # Eq. 8, then λ >= 0

        frozen = self._lookup(self._frozen, index, None)
        if frozen is not None:
            keep = self._on_device("keep", self._key_for(self._frozen, index), ~frozen, weight)
            weight[:] = weight * keep
            state[:] = state * keep

    def _key_for(self, table, index):
        return index if index in table else self._name_of(index)

    # -- pickling (Trainer.save_states / load_states) -----------------------------------------------

    def __getstate__(self):
        state = super().__getstate__()
        state["_device_copies"] = {}
        return state
