"""The optimisers against PyTorch: SGD(foreach=False) fed a list with repeats, and Adam."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpsl_jax.train import optim

# torch warns about the duplicated tensors that this file feeds it on purpose.
pytestmark = pytest.mark.filterwarnings('ignore:optimizer contains a parameter group with duplicate')

MAX_STEPS = 10  # short decay so the lr changes a lot over the tested steps
N_STEPS = 6

# name -> (shape, group, multiplicity): the stem (k=1), a block conv (k=3), a shortcut conv
# (k=4), a head leaf and the prototypes (k=1 outside the backbone).
LEAVES = {
    'stem': ((3, 4), 'backbone', 1),
    'block': ((5,), 'backbone', 3),
    'shortcut': ((2, 3), 'backbone', 4),
    'head': ((4, 2), 'head', 1),
    'prototypes': ((3, 6), 'prototypes', 1),
}
MULTS = {'backbone': 1.0, 'head': 5.0, 'prototypes': 5.0}


def _poly_lr(base, t):
    """The reference's per-iteration lr, computed in Python floats."""
    return base * (1 - t / MAX_STEPS) ** 0.9


def _torch_sgd_run(params0, grads, base_lr, momentum, wd, repeated):
    """Runs torch SGD(foreach=False) over a parameter list that repeats tensors k times."""
    torch = pytest.importorskip('torch')
    tensors = {n: torch.tensor(v) for n, v in params0.items()}
    groups = {}
    max_k = max(k for _, _, k in LEAVES.values())
    # Copies of one tensor interleave with other tensors, as the reference's module walk does.
    for r in range(max_k):
        for name, (_, group, k) in LEAVES.items():
            if r < (k if repeated else 1):
                groups.setdefault(group, []).append(tensors[name])
    opt = torch.optim.SGD([{'params': ps, 'mult': MULTS[g]} for g, ps in groups.items()],
                          lr=base_lr, momentum=momentum, weight_decay=wd, foreach=False)
    history = []
    for t, g in enumerate(grads):
        for pg in opt.param_groups:
            pg['lr'] = _poly_lr(base_lr, t) * pg['mult']
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(g[name])
        opt.step()
        history.append({n: v.detach().numpy().copy() for n, v in tensors.items()})
    return history


def _jax_run(params0, grads, base_lr, momentum, wd, repeated, dtype):
    labels = {n: group for n, (_, group, _) in LEAVES.items()}
    multiplicity = {n: k for n, (_, _, k) in LEAVES.items()}
    tx = optim.make_optimizer(dict(lr=base_lr, max_steps=MAX_STEPS, momentum=momentum,
                                   weight_decay=wd, lr_multipliers=MULTS,
                                   repeated_updates=repeated),
                              labels=labels, multiplicity=multiplicity)
    params = {n: jnp.asarray(v, dtype) for n, v in params0.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for g in grads:
        params, state = step(params, state, {n: jnp.asarray(v, dtype) for n, v in g.items()})
        history.append({n: np.asarray(v) for n, v in params.items()})
    return history


def _random_problem(seed):
    rng = np.random.default_rng(seed)
    params0 = {n: rng.normal(size=shape) for n, (shape, _, _) in LEAVES.items()}
    grads = [{n: rng.normal(size=shape) for n, (shape, _, _) in LEAVES.items()}
             for _ in range(N_STEPS)]
    return params0, grads


@pytest.mark.torch
@pytest.mark.parametrize('repeated', [True, False])
def test_sgd_matches_torch_float64(repeated):
    params0, grads = _random_problem(0 if repeated else 1)
    # A large lr and decay make the repeated update's differences far above the tolerance.
    base_lr, momentum, wd = 0.05, 0.9, 0.03
    want = _torch_sgd_run(params0, grads, base_lr, momentum, wd, repeated)
    with jax.enable_x64(True):
        got = _jax_run(params0, grads, base_lr, momentum, wd, repeated, jnp.float64)
    for t in range(N_STEPS):
        for name in LEAVES:
            np.testing.assert_allclose(got[t][name], want[t][name], rtol=1e-12, atol=1e-13,
                                       err_msg=f'step {t} leaf {name}')
    # The switch matters: repeated and single runs differ on the leaves with k > 1 only.
    other = _torch_sgd_run(params0, grads, base_lr, momentum, wd, not repeated)
    for name, (_, _, k) in LEAVES.items():
        differs = not np.allclose(other[-1][name], want[-1][name], rtol=1e-6)
        assert differs == (k > 1), name


@pytest.mark.torch
def test_sgd_matches_torch_float32_reference_hyperparameters():
    params0, grads = _random_problem(2)
    params0 = {n: v.astype(np.float32) for n, v in params0.items()}
    grads = [{n: v.astype(np.float32) for n, v in g.items()} for g in grads]
    want = _torch_sgd_run(params0, grads, 1e-2, 0.9, 2e-4, True)
    got = _jax_run(params0, grads, 1e-2, 0.9, 2e-4, True, jnp.float32)
    for name in LEAVES:
        np.testing.assert_allclose(got[-1][name], want[-1][name], rtol=2e-6, atol=2e-6)


def test_schedule_is_reference_poly():
    with jax.enable_x64(True):
        sched = optim.make_schedule(2.5e-4, max_steps=90_000, power=0.9)
        for t in [0, 1, 1234, 45_000, 89_999, 90_000]:
            np.testing.assert_allclose(float(sched(jnp.asarray(t))),
                                       2.5e-4 * (1 - t / 90_000) ** 0.9, rtol=1e-12, atol=0)


@pytest.mark.torch
def test_adam_matches_torch():
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(3)
    shapes = {'w': (4, 3), 'b': (3,)}
    params0 = {n: rng.normal(size=s) for n, s in shapes.items()}
    # Gradients of very different scales exercise eps and the bias corrections.
    grads = [{n: rng.normal(size=s) * 10.0 ** rng.integers(-9, 2) for n, s in shapes.items()}
             for _ in range(N_STEPS)]
    base_lr = 1e-2

    tensors = {n: torch.tensor(v) for n, v in params0.items()}
    opt = torch.optim.Adam(list(tensors.values()), lr=base_lr, betas=(0.9, 0.99))
    want = []
    for t, g in enumerate(grads):
        for pg in opt.param_groups:
            pg['lr'] = _poly_lr(base_lr, t)
        for n, tensor in tensors.items():
            tensor.grad = torch.tensor(g[n])
        opt.step()
        want.append({n: v.detach().numpy().copy() for n, v in tensors.items()})

    with jax.enable_x64(True):
        tx = optim.make_discriminator_optimizer(lr=base_lr, max_steps=MAX_STEPS)
        params = {n: jnp.asarray(v) for n, v in params0.items()}
        state = tx.init(params)
        for t, g in enumerate(grads):
            updates, state = tx.update({n: jnp.asarray(v) for n, v in g.items()}, state, params)
            params = optax.apply_updates(params, updates)
            for n in shapes:
                np.testing.assert_allclose(np.asarray(params[n]), want[t][n], rtol=1e-11,
                                           atol=1e-13, err_msg=f'step {t} leaf {n}')


def test_labels_function_and_bad_config():
    params = {'a': jnp.ones((2,)), 'b': jnp.ones((3,))}
    labels_fn = lambda p: {'a': 'backbone', 'b': 'head'}
    tx = optim.make_optimizer(lr=0.1, max_steps=10, weight_decay=0.0, momentum=0.0,
                              lr_multipliers={'backbone': 1.0, 'head': 10.0}, labels=labels_fn)
    state = tx.init(params)
    grads = {'a': jnp.full((2,), 2.0), 'b': jnp.full((3,), 3.0)}
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates['a'], -0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates['b'], -1.0 * 3.0, rtol=1e-6)

    with pytest.raises(ValueError, match='unknown keys'):
        optim.make_optimizer({'lr': 0.1, 'nesterov': True})
    bad = optim.make_optimizer(lr=0.1, lr_multipliers={'backbone': 1.0}, labels=labels_fn)
    with pytest.raises(ValueError, match="'head'"):
        bad.update(grads, bad.init(params), params)
    with pytest.raises(ValueError, match='multiplicity'):
        tx2 = optim.make_optimizer(lr=0.1, multiplicity={'a': 1})
        tx2.update(grads, tx2.init(params), params)
