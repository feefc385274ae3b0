"""The Fourier-space forward model against a brute-force pixel-space convolution."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.forward import legendre_basis, make_forward_model
from kinjax.losvd import GaussHermite, SandersEvans


def _templates(n_templates=3, velscale=30.0, lam0=4500.0, n_pix=1200, seed=0):
    """Synthetic log-sampled templates with sharp absorption lines."""
    rng = np.random.default_rng(seed)
    ln_wave = np.log(lam0) + np.arange(n_pix) * velscale / C_KMS
    flux = np.ones((n_templates, n_pix))
    for t in range(n_templates):
        for centre in rng.uniform(50, n_pix - 50, 40):
            depth, width = rng.uniform(0.05, 0.5), rng.uniform(0.7, 3.0)
            flux[t] -= depth * np.exp(-0.5 * ((np.arange(n_pix) - centre) / width) ** 2)
    return SimpleNamespace(
        ln_wave=ln_wave, wave=np.exp(ln_wave), flux=flux, velscale=velscale,
        n_pix=n_pix, n_templates=n_templates,
    )


def _spectrum(tpl, ratio=2, redshift=0.003, offset_pix=0.37, n_pix=350):
    """A galaxy grid inside the templates' range, with a sub-pixel offset."""
    velscale = tpl.velscale * ratio
    start = tpl.ln_wave[0] + np.log1p(redshift) + (300 + offset_pix) * tpl.velscale / C_KMS
    ln_wave = start + np.arange(n_pix) * velscale / C_KMS
    return SimpleNamespace(
        ln_wave=ln_wave, wave=np.exp(ln_wave), velscale=velscale, redshift=redshift,
        mask=np.ones(n_pix, bool),
    )


def _brute_force(tpl, gal, losvd, weights):
    """Direct sum over template pixels of T(m) L(position - m), at every sub-pixel."""
    ratio = int(round(gal.velscale / tpl.velscale))
    vt = tpl.velscale
    # position (template pixels, rest frame) of every sub-pixel of every galaxy pixel
    sub = (np.arange(ratio) - (ratio - 1) / 2) * vt / C_KMS
    ln_rest = gal.ln_wave[:, None] - np.log1p(gal.redshift) + sub[None, :]
    pos = (ln_rest - tpl.ln_wave[0]) / (vt / C_KMS)  # (n_pix, ratio)
    m = np.arange(tpl.n_pix)
    kernel = np.asarray(losvd.pdf(jnp.asarray((pos[..., None] - m) * vt))) * vt
    mixed = weights @ tpl.flux
    return (kernel @ mixed).mean(axis=1)


@pytest.mark.parametrize("ratio", [1, 2, 3])
@pytest.mark.parametrize(
    "losvd",
    [
        GaussHermite(v=123.0, sigma=150.0, h=jnp.array([0.1, -0.05])),
        GaussHermite(v=-1400.0, sigma=80.0, h=jnp.array([-0.05, 0.08, 0.02, 0.01])),
        SandersEvans(v=1800.0, sigma=200.0, sigma_k=0.8, delta=0.3, kappa=0.5),
    ],
)
def test_matches_brute_force_convolution(ratio, losvd):
    tpl = _templates()
    gal = _spectrum(tpl, ratio=ratio, n_pix=300 // ratio * 2)
    weights = np.array([0.5, 0.3, 0.2])
    model = make_forward_model(tpl, gal, degree=-1, vmax=2500.0)
    fourier = np.asarray(model(losvd, weights))
    brute = _brute_force(tpl, gal, losvd, weights)
    assert np.max(np.abs(fourier - brute)) <= 1e-5 * np.max(np.abs(brute))
    # the design matrix gives the same model
    design = np.asarray(model.design_matrix(losvd))
    np.testing.assert_allclose(design @ weights, fourier, rtol=0, atol=1e-12)


def test_zero_velocity_delta_like_losvd_reproduces_template():
    """A very narrow LOSVD at V=0 returns the template sampled at the galaxy pixels."""
    tpl = _templates(n_templates=1)
    gal = _spectrum(tpl, ratio=1, redshift=0.0, offset_pix=0.0)
    model = make_forward_model(tpl, gal, degree=-1, vmax=500.0)
    out = np.asarray(model(GaussHermite(v=0.0, sigma=1e-3, h=jnp.zeros(0)), jnp.ones(1)))
    expected = tpl.flux[0, 300 : 300 + gal.ln_wave.size]
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_velocity_shift_moves_lines_by_the_right_number_of_pixels():
    tpl = _templates(n_templates=1)
    gal = _spectrum(tpl, ratio=1, redshift=0.0, offset_pix=0.0)
    model = make_forward_model(tpl, gal, degree=-1, vmax=1000.0)
    shift = 7  # pixels
    v = shift * tpl.velscale
    out = np.asarray(model(GaussHermite(v=v, sigma=1e-3, h=jnp.zeros(0)), jnp.ones(1)))
    expected = tpl.flux[0, 300 - shift : 300 - shift + gal.ln_wave.size]
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_polynomials():
    tpl = _templates()
    gal = _spectrum(tpl)
    model = make_forward_model(tpl, gal, degree=2, mdegree=3, vmax=1000.0)
    losvd = GaussHermite(v=10.0, sigma=100.0, h=jnp.zeros(2))
    w, a, m = np.array([1.0, 0.5, 0.2]), np.array([0.1, -0.2, 0.05]), np.array([0.1, 0.02, -0.03])
    x = np.linspace(-1, 1, gal.ln_wave.size)
    mpoly = 1 + np.polynomial.legendre.legval(x, np.r_[0.0, m])
    apoly = np.polynomial.legendre.legval(x, a)
    plain = np.asarray(model(losvd, w))
    np.testing.assert_allclose(np.asarray(model(losvd, w, a, m)), plain * mpoly + apoly, atol=1e-12)
    design = np.asarray(model.design_matrix(losvd, m))
    np.testing.assert_allclose(design @ np.r_[w, a], plain * mpoly + apoly, atol=1e-12)
    assert legendre_basis(5, -1).shape == (0, 5)


def test_two_components_add_up():
    tpl1, tpl2 = _templates(2, seed=1), _templates(2, seed=2)
    gal = _spectrum(tpl1)
    l1 = GaussHermite(v=150.0, sigma=60.0, h=jnp.zeros(0))
    l2 = GaussHermite(v=-150.0, sigma=90.0, h=jnp.zeros(0))
    both = make_forward_model([tpl1, tpl2], gal, degree=-1)
    m1 = make_forward_model(tpl1, gal, degree=-1)
    m2 = make_forward_model(tpl2, gal, degree=-1)
    w = np.array([0.3, 0.7, 0.4, 0.1])
    np.testing.assert_allclose(
        np.asarray(both((l1, l2), w)),
        np.asarray(m1(l1, w[:2]) + m2(l2, w[2:])),
        atol=1e-12,
    )
    with pytest.raises(KinjaxError, match="component"):
        both(l1, w)


def test_mixture_split_over_components_with_equal_light():
    """A Mixture given to a two-component model: component c is convolved with f_c L_c, and
    the NNLS with the equal-light rows returns weights whose light fractions are f_c, so
    that a spectrum made of two populations with light 0.3 / 0.7 is fitted exactly."""
    from kinjax.linear import solve_linear
    from kinjax.losvd import Gaussian, Mixture

    tpl1, tpl2 = _templates(2, seed=1), _templates(2, seed=2)
    gal = _spectrum(tpl1)
    g1, g2 = Gaussian(150.0, 60.0), Gaussian(-150.0, 90.0)
    mix = Mixture((g1, g2), jnp.array([0.3, 0.7]))
    both = make_forward_model([tpl1, tpl2], gal, degree=0)
    w = np.array([0.3, 0.7, 0.4, 0.1])
    np.testing.assert_allclose(np.asarray(both(mix, w)), np.asarray(both((g1, g2), w * [0.3, 0.3, 0.7, 0.7])),
                               atol=1e-12)
    # data: population 1 (light 0.3) at +150, population 2 (0.7) at -150, plus a constant
    light = np.asarray(both.light)
    x1, x2 = np.array([1.0, 2.0]), np.array([0.5, 3.0])
    x1, x2 = x1 / (x1 @ light[:2]), x2 / (x2 @ light[2:])  # unit light each
    y = np.asarray(both((g1, g2), np.r_[0.3 * x1, 0.7 * x2]) + 0.2)
    a, yy, ww = both.linear_system(mix, jnp.asarray(y), jnp.ones(y.size))
    assert a.shape[0] == y.size + 1 and yy.shape == ww.shape == (y.size + 1,)
    x = np.asarray(solve_linear(a, yy, ww, jnp.asarray(np.r_[np.ones(4, bool), False])))
    np.testing.assert_allclose(x[:4], np.r_[x1, x2], rtol=1e-4)  # normal equations with a 1e3-weighted row
    np.testing.assert_allclose(x[4], 0.2, rtol=1e-4)
    assert abs(x[:2] @ light[:2] - x[2:4] @ light[2:]) < 1e-5 * (x[:2] @ light[:2])
    # pPXF-style independent components get no constraint
    assert both.light_constraints((g1, g2)) is None
    with pytest.raises(KinjaxError, match="component"):
        both(Mixture((g1, g2, g1), jnp.ones(3)), np.ones(4))


def test_float32_agrees_with_float64():
    tpl = _templates()
    gal = _spectrum(tpl)
    losvd = GaussHermite(v=300.0, sigma=180.0, h=jnp.array([0.05, 0.03]))
    m64 = make_forward_model(tpl, gal, dtype=np.float64)
    m32 = make_forward_model(tpl, gal, dtype=np.float32)
    lv32 = GaussHermite(v=jnp.float32(300.0), sigma=jnp.float32(180.0), h=jnp.array([0.05, 0.03], jnp.float32))
    out32 = m32(lv32, jnp.ones(3, jnp.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), np.asarray(m64(losvd, np.ones(3))), rtol=2e-5, atol=2e-5)


def test_gradients_over_parameter_range():
    tpl = _templates()
    gal = _spectrum(tpl)
    model = make_forward_model(tpl, gal, vmax=2500.0)
    w = jnp.array([0.5, 0.3, 0.2])

    def f(theta):
        lv = GaussHermite(v=theta[0], sigma=theta[1], h=theta[2:])
        return jnp.sum(model(lv, w) ** 2)

    for theta in ([0.0, 20.0, 0.3, -0.3], [1500.0, 600.0, -0.3, 0.3], [-1500.0, 150.0, 0.1, 0.1]):
        check_grads(f, (jnp.array(theta),), order=1, modes=("rev",), atol=1e-4, rtol=1e-4)
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(jnp.array(theta)))))


def test_batch_compiles_once_and_matches_loop():
    tpl = _templates()
    gal = _spectrum(tpl)
    model = make_forward_model(tpl, gal)
    traces = []

    @jax.jit
    def batch(theta, weights):
        traces.append(1)
        one = lambda th, w: model(GaussHermite(v=th[0], sigma=th[1], h=th[2:]), w)
        return jax.vmap(one)(theta, weights)

    rng = np.random.default_rng(3)
    theta = jnp.asarray(np.c_[rng.uniform(-500, 500, 16), rng.uniform(50, 300, 16), rng.uniform(-0.1, 0.1, (16, 2))])
    weights = jnp.asarray(rng.uniform(0, 1, (16, 3)))
    out = batch(theta, weights)
    batch(theta + 1.0, weights * 2)
    assert len(traces) == 1
    loop = np.stack([np.asarray(model(GaussHermite(v=t[0], sigma=t[1], h=t[2:]), w)) for t, w in zip(theta, weights)])
    np.testing.assert_allclose(np.asarray(out), loop, atol=1e-12)


def test_templates_too_short_for_vmax():
    tpl = _templates(n_pix=700)
    gal = _spectrum(tpl, n_pix=150)
    with pytest.raises(KinjaxError, match="templates cover"):
        make_forward_model(tpl, gal, vmax=20000.0)


def test_non_integer_velscale_ratio():
    tpl = _templates()
    gal = _spectrum(tpl)
    gal.velscale = tpl.velscale * 1.5
    with pytest.raises(KinjaxError, match="integer"):
        make_forward_model(tpl, gal)


def test_convolved_subset_is_those_rows_convolved_by_brute_force():
    """``convolved_subset`` (the MAP loop's support-first solve) convolves only the rows
    asked for: each is the brute-force convolution of that template alone; one and two
    kinematic components, repeated rows included."""
    tpl = _templates(4, seed=3)
    gal = _spectrum(tpl)
    losvd = GaussHermite(v=-80.0, sigma=110.0, h=jnp.array([0.05, -0.03]))
    fm = make_forward_model(tpl, gal, degree=2, mdegree=2)
    index = jnp.asarray([2, 0, 2])
    mult = jnp.asarray([0.1, -0.05])
    sub = np.asarray(fm.convolved_subset(losvd, index, mult))
    poly = np.asarray(fm.multiplicative_polynomial(mult))
    for row, t in zip(sub, np.asarray(index)):
        np.testing.assert_allclose(row, _brute_force(tpl, gal, losvd, np.eye(4)[t]) * poly, atol=1e-6)
    two = make_forward_model([tpl, _templates(2, seed=4)], gal, degree=-1)
    other = GaussHermite(v=150.0, sigma=70.0, h=jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(two.convolved_subset((losvd, other), jnp.asarray([5, 1]))),
                               np.asarray(two.convolved_templates((losvd, other)))[[5, 1]], atol=1e-12)
