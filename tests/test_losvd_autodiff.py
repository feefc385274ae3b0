"""LOSVD families under JAX transformations: gradients, jit, vmap, float32; vectors; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kinjax.errors import KinjaxError
from kinjax.losvd import (
    GaussHermite,
    Gaussian,
    Histogram,
    Mixture,
    SandersEvans,
    constrain_delta,
    delta_max,
    unconstrain_delta,
    velocity_grid,
)

OMEGA = jnp.array([0.001, 0.004, 0.01, 0.03])  # rad per km/s


def _ft_sum(family, **static):
    def f(theta):
        z = family.from_vector(theta, **static).ft(OMEGA)
        return jnp.sum(jnp.real(z) + jnp.imag(z))

    return f


@pytest.mark.parametrize(
    "theta",
    [
        [0.0, 20.0, 0.3, -0.3],
        [1500.0, 600.0, -0.3, 0.3],
        [-1500.0, 150.0, 0.1, 0.05],
        [300.0, 60.0, -0.2, -0.25],
    ],
)
def test_gauss_hermite_grads(theta):
    check_grads(_ft_sum(GaussHermite), (jnp.array(theta),), order=1, modes=["fwd", "rev"], eps=1e-4)


@pytest.mark.parametrize(
    "theta",
    [
        [100.0, 150.0, 1.0, 0.4, 0.3],
        [-1500.0, 600.0, 0.2, -0.5, -0.9],
        [800.0, 20.0, 4.0, 0.1, 0.9],
        [0.0, 200.0, 2.0, -0.3, 0.0],
    ],
)
def test_sanders_evans_grads(theta):
    check_grads(_ft_sum(SandersEvans), (jnp.array(theta),), order=1, modes=["fwd", "rev"], eps=1e-5)

    def pdf_sum(th):
        return jnp.sum(SandersEvans.from_vector(th).pdf(jnp.linspace(-3000.0, 3000.0, 31)))

    check_grads(pdf_sum, (jnp.array(theta),), order=1, modes=["fwd", "rev"], eps=1e-5)


@pytest.mark.parametrize("kernel", ["uniform", "laplace"])
def test_sanders_evans_pure_kernel_grads(kernel):
    check_grads(_ft_sum(SandersEvans, kernel=kernel), (jnp.array([50.0, 120.0, 1.5, 0.5]),), order=1, modes=["fwd", "rev"], eps=1e-5)


def test_second_order_grads():
    """Hessians too (a Laplace approximation needs them), on one case per family."""
    check_grads(_ft_sum(GaussHermite), (jnp.array([200.0, 150.0, 0.1, -0.1]),), order=2, modes=["rev"], eps=1e-4)
    check_grads(_ft_sum(SandersEvans), (jnp.array([200.0, 150.0, 1.0, 0.3, 0.4]),), order=2, modes=["rev"], eps=1e-4)


def test_histogram_and_mixture_grads():
    centres = jnp.asarray(velocity_grid(500.0, 50.0))

    def hist(logits):
        z = Histogram.from_logits(centres, logits).ft(OMEGA)
        return jnp.sum(jnp.real(z) + jnp.imag(z))

    check_grads(hist, (jnp.linspace(-1.0, 1.0, centres.shape[0]),), order=1, modes=["fwd", "rev"], eps=1e-5)
    fams = (Gaussian, GaussHermite)
    check_grads(
        lambda th: jnp.sum(jnp.abs(Mixture.from_vector(th, fams).ft(OMEGA)) ** 2),
        (jnp.array([-150.0, 60.0, 150.0, 80.0, 0.05, 0.02, 0.4, 0.6]),),
        order=1,
        modes=["fwd", "rev"],
        eps=1e-5,
    )


CASES = [
    (GaussHermite, {}, np.array([[0.0, 100.0, 0.1, -0.05], [500.0, 250.0, -0.2, 0.1], [-900.0, 40.0, 0.0, 0.3]])),
    (SandersEvans, {}, np.array([[0.0, 100.0, 1.0, 0.4, 0.3], [500.0, 250.0, 0.2, -0.5, -1.0], [-900.0, 40.0, 5.0, 0.1, 1.0]])),
    (SandersEvans, {"kernel": "uniform"}, np.array([[0.0, 100.0, 1.0, 0.7], [500.0, 250.0, 0.2, -0.5]])),
    (Gaussian, {}, np.array([[0.0, 100.0], [30.0, 300.0]])),
]


@pytest.mark.parametrize("family, static, thetas", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_jit_and_vmap_match_loop(family, static, thetas):
    omega = jnp.linspace(-0.1, 0.1, 33)
    v = jnp.linspace(-2000.0, 2000.0, 41)

    def both(theta):
        losvd = family.from_vector(theta, **static)
        return losvd.ft(omega), losvd.pdf(v), losvd.skewness

    loop = [both(jnp.asarray(t)) for t in thetas]
    batched = jax.jit(jax.vmap(both))(jnp.asarray(thetas))
    for i in range(len(thetas)):
        for a, b in zip(batched, loop[i]):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_vmap_histogram_and_mixture():
    centres = jnp.asarray(velocity_grid(300.0, 30.0))
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, centres.shape[0]))
    batched = jax.vmap(lambda lg: Histogram.from_logits(centres, lg).ft(OMEGA))(logits)
    for i in range(4):
        np.testing.assert_allclose(batched[i], Histogram.from_logits(centres, logits[i]).ft(OMEGA), rtol=1e-12)
    fracs = jnp.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    comps = (Gaussian(-100.0, 50.0), SandersEvans(100.0, 80.0, 1.0, 0.2, 0.5))
    batched = jax.vmap(lambda f: Mixture(comps, f).ft(OMEGA))(fracs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], Mixture(comps, fracs[i]).ft(OMEGA), rtol=1e-12)


@pytest.mark.parametrize("family, static, thetas", CASES, ids=lambda x: getattr(x, "__name__", ""))
def test_float32_matches_float64(family, static, thetas):
    omega = np.linspace(-0.15, 0.15, 61)
    for theta in thetas:
        theta = theta.copy()
        theta[0] = np.clip(theta[0], -300, 300)  # velocities relative to systemic
        z64 = family.from_vector(jnp.asarray(theta, jnp.float64), **static).ft(jnp.asarray(omega, jnp.float64))
        z32 = family.from_vector(jnp.asarray(theta, jnp.float32), **static).ft(jnp.asarray(omega, jnp.float32))
        assert z32.dtype == jnp.complex64
        assert np.max(np.abs(np.asarray(z32) - np.asarray(z64))) < 1e-5


def test_float32_histogram():
    centres = velocity_grid(300.0, 30.0)
    w = np.exp(-0.5 * (centres / 100) ** 2)
    omega = np.linspace(-0.15, 0.15, 61)
    z64 = Histogram(centres, w).ft(omega)
    z32 = Histogram(centres.astype(np.float32), w.astype(np.float32)).ft(omega.astype(np.float32))
    assert np.max(np.abs(np.asarray(z32) - np.asarray(z64))) < 1e-5


# ------------------------------------------------------------------ vectors
def test_vectors_names_and_bounds_agree():
    examples = [
        (GaussHermite(10.0, 100.0, jnp.array([0.1, 0.0, 0.02, 0.03])), {"moments": 6}),
        (Gaussian(10.0, 100.0), {}),
        (SandersEvans(10.0, 100.0, 1.0, 0.2, 0.1), {}),
        (SandersEvans(10.0, 100.0, 1.0, 0.2, kernel="laplace"), {"kernel": "laplace"}),
    ]
    for losvd, static in examples:
        theta = losvd.to_vector()
        names = type(losvd).parameter_names(**static)
        lower, upper = type(losvd).default_bounds(**static)
        assert theta.shape == (len(names),) == lower.shape == upper.shape
        assert np.all(lower < upper) and np.all((lower <= theta) & (theta <= upper))
        build_static = {k: v for k, v in static.items() if k != "moments"}
        np.testing.assert_array_equal(type(losvd).from_vector(theta, **build_static).to_vector(), theta)
    assert GaussHermite.parameter_names() == ("v", "sigma", "h3", "h4")
    centres = velocity_grid(100.0, 50.0)
    h = Histogram(centres, [1.0, 2.0, 3.0, 2.0, 2.0])
    np.testing.assert_allclose(h.to_vector(), [0.1, 0.2, 0.3, 0.2, 0.2])
    np.testing.assert_allclose(Histogram.from_vector(h.to_vector(), centres=centres).weights, h.weights)
    fams, statics = (Gaussian, SandersEvans), [{}, {"kernel": "uniform"}]
    mix = Mixture((Gaussian(-100.0, 50.0), SandersEvans(100.0, 80.0, 1.0, 0.6, kernel="uniform")), jnp.array([0.3, 0.7]))
    theta = mix.to_vector()
    assert len(Mixture.parameter_names(fams, statics)) == theta.shape[0] == 2 + 4 + 2
    np.testing.assert_array_equal(Mixture.from_vector(theta, fams, statics).to_vector(), theta)


def test_constrained_delta():
    u = jnp.linspace(-20.0, 20.0, 41)
    for kernel in ("uniform", "laplace", "mixture"):
        delta = constrain_delta(u, kernel)
        assert np.all(np.abs(np.asarray(delta)) <= delta_max(kernel))
        np.testing.assert_allclose(unconstrain_delta(constrain_delta(0.7, kernel), kernel), 0.7, rtol=1e-12)
        # even where tanh(u) rounds to ±1 (traced, so unchecked) the pdf stays finite
        kappa = -1.0 if kernel == "uniform" else 1.0
        edge = jax.jit(lambda u: SandersEvans(0.0, 100.0, 1.0, constrain_delta(u, kernel), kappa, kernel=kernel).pdf(jnp.linspace(-500.0, 500.0, 11)))
        assert np.all(np.isfinite(np.asarray(edge(jnp.asarray(40.0)))))
    assert abs(delta_max("uniform") - np.sqrt(0.6)) < 1e-15 and abs(delta_max("laplace") - 1 / np.sqrt(3)) < 1e-15


def test_traced_construction_does_not_validate():
    """Under jit the constructor must accept traced values (no concrete checks)."""
    f = jax.jit(lambda th: SandersEvans.from_vector(th).ft(OMEGA))
    assert f(jnp.array([0.0, 100.0, 1.0, 0.3, 0.0])).shape == OMEGA.shape


@pytest.mark.parametrize(
    "build",
    [
        lambda: Gaussian(0.0, -1.0),
        lambda: GaussHermite(0.0, 0.0, [0.1]),
        lambda: GaussHermite(0.0, 100.0, [[0.1]]),
        lambda: SandersEvans(0.0, 100.0, 1.0, 0.6, 0.0),
        lambda: SandersEvans(0.0, 100.0, 1.0, 0.78, -1.0),
        lambda: SandersEvans(0.0, 100.0, 1.0, 0.6, kernel="laplace"),
        lambda: SandersEvans(0.0, 100.0, 0.0, 0.1, 0.0),
        lambda: SandersEvans(0.0, 100.0, 1.0, 0.1, 1.5),
        lambda: SandersEvans(0.0, 100.0, 1.0, 0.1, kernel="cosine"),
        lambda: Histogram([0.0, 10.0, 30.0], [0.3, 0.3, 0.4]),
        lambda: Histogram([0.0, 10.0, 20.0], [0.3, -0.3, 1.0]),
        lambda: Histogram([0.0, 10.0, 20.0], [0.5, 0.5]),
        lambda: Mixture((Gaussian(0.0, 10.0),), [0.5, 0.5]),
        lambda: Mixture((Gaussian(0.0, 10.0), "x"), [0.5, 0.5]),
        lambda: Mixture((Gaussian(0.0, 10.0), Gaussian(1.0, 10.0)), [1.5, -0.5]),
        lambda: velocity_grid(100.0, 0.0),
    ],
)
def test_bad_input_raises(build):
    with pytest.raises(KinjaxError):
        build()


def test_uniform_edge_allowed_only_for_pure_uniform():
    SandersEvans(0.0, 100.0, 1.0, 0.7, -1.0)  # mixture with κ = −1 is the uniform kernel
    SandersEvans(0.0, 100.0, 1.0, 0.7, kernel="uniform")
    with pytest.raises(KinjaxError):
        SandersEvans(0.0, 100.0, 1.0, 0.7, -0.99)
