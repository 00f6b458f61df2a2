"""The ideal-observer tool (pdacscreen.io.phantom.observer): closed forms, the generator's noise,
and lesion d' in the phantom's truth."""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.anatomy import draw_anatomy
from pdacscreen.io.phantom.observer import (
    QUANTISATION_VAR,
    ImageFormation,
    generator_nps,
    lesion_images,
    lesion_visibility,
    npw_dprime,
    npw_sensitivity,
    prewhitening_dprime,
)
from pdacscreen.io.phantom.subject import _draw_findings, _noise, _subject_rngs, make_subject
from pdacscreen.io.phantom.tissue import N_TISSUES


def _sphere(shape, spacing, radius_mm):
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing, strict=True)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return (z**2 + y**2 + x**2) <= radius_mm**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7)])
def test_uniform_sphere_in_white_noise_matches_closed_form(spacing):
    contrast, sigma, radius = 7.0, 12.0, 6.0
    mask = _sphere((24, 40, 40), spacing, radius)
    n_vox = int(mask.sum())
    signal = contrast * mask
    d = npw_dprime(signal, nps=sigma**2)
    assert d == pytest.approx(contrast * np.sqrt(n_vox) / sigma, rel=1e-12)
    # N = V / v: the voxel count follows the sphere's volume and the voxel volume
    v = float(np.prod(spacing))
    assert n_vox == pytest.approx(4 / 3 * np.pi * radius**3 / v, rel=0.1)
    # in white noise the NPW template is already the prewhitened one
    assert prewhitening_dprime(signal, nps=sigma**2) == pytest.approx(d, rel=1e-12)


def test_zero_signal_has_zero_dprime_and_dprime_is_linear_in_contrast():
    mask = _sphere((10, 32, 32), (2.0, 0.8, 0.8), 5.0).astype(float)
    nps = generator_nps((32, 32), grain_px=1.3) * 11.0**2
    assert npw_dprime(0.0 * mask, nps=nps, white_var=QUANTISATION_VAR) == 0.0
    d1 = npw_dprime(3.0 * mask, nps=nps, white_var=QUANTISATION_VAR)
    d2 = npw_dprime(6.0 * mask, nps=nps, white_var=QUANTISATION_VAR)
    d5 = npw_dprime(-15.0 * mask, nps=nps, white_var=QUANTISATION_VAR)
    assert d1 > 0
    assert d2 == pytest.approx(2 * d1, rel=1e-12)
    assert d5 == pytest.approx(5 * d1, rel=1e-12)


def test_correlated_noise_npw_is_below_prewhitening():
    mask = _sphere((6, 48, 48), (2.0, 0.8, 0.8), 4.0).astype(float)
    nps = generator_nps((48, 48), grain_px=1.0) * 10.0**2 + 1.0  # grain plus a white floor
    npw = npw_dprime(mask * 8.0, nps=nps)
    pw = prewhitening_dprime(mask * 8.0, nps=nps)
    assert 0 < npw < pw
    # the spectrum is normalised: mean power = variance
    assert float(generator_nps((48, 48), grain_px=1.0).mean()) == pytest.approx(1.0)


def test_fourier_variance_matches_the_generators_own_noise():
    """s^T K s from the NPS equals the variance of s . n over the generator's noise (_noise)."""
    rng = np.random.default_rng(5)
    shape, grain = (4, 40, 40), 1.4
    yy, xx = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    amp = 10.0 + 0.2 * xx  # spatially varying, as the generator's body-shaped map
    signal = np.zeros(shape)
    signal[1:3, 12:28, 14:26] = rng.uniform(1, 5, (2, 16, 12))
    nps = generator_nps(shape[1:], grain_px=grain)
    d = npw_dprime(signal, nps=nps, amplitude=amp[None])
    predicted_var = (signal**2).sum() ** 2 / d**2
    stats = [float((signal * _noise(rng, shape, grain, amp)).sum()) for _ in range(600)]
    assert np.var(stats) == pytest.approx(predicted_var, rel=0.15)


def test_sensitivity_at_specificity():
    assert float(npw_sensitivity(0.0, specificity=0.95)) == pytest.approx(0.05, abs=1e-9)
    assert float(npw_sensitivity(1.6448536, specificity=0.95)) == pytest.approx(0.5, abs=1e-6)
    s = npw_sensitivity(np.array([1.0, 2.0, 4.0]), specificity=0.95)
    assert np.all(np.diff(s) > 0) and s[-1] > 0.95
    with pytest.raises(InputError):
        npw_sensitivity(1.0, specificity=1.0)


def _formation(center, *, lut, delta, noise=12.0):
    """A small grid around the lesion (body frame), 2 mm slices of 3 sub-slices, 1 mm pixels."""
    gz = center[2] + np.arange(-20, 21) * 2.0
    gy = center[1] + np.arange(-40, 41) * 1.0
    gx = center[0] + np.arange(-40, 41) * 1.0
    return ImageFormation(
        gz=gz,
        gy=gy,
        gx=gx,
        sub_offsets=np.array([-2 / 3, 0.0, 2 / 3]),
        lut=lut,
        texture_lut=np.zeros(N_TISSUES, np.float32),
        lesion_delta=delta,
        psf_sigma_px=0.8,
        grain_px=1.2,
        noise_amp_hu=np.full((len(gy), len(gx)), noise),
    )


def _anatomy(seed, **override):
    fr, ar, _, _ = _subject_rngs(seed)
    findings = _draw_findings(fr, None, "pdac")
    if override:
        findings = type(findings)(**{**findings.__dict__, **override})
    return draw_anatomy(ar, findings)


def test_lesion_without_contrast_is_invisible_and_dprime_scales_with_its_delta():
    an = _anatomy(3, fatty_pancreas=False)
    flat = np.full(N_TISSUES, 40.0, np.float32)  # every tissue alike: only the lesion's delta
    c = np.asarray(an.lesion.center)
    zero = lesion_visibility(an, _formation(c, lut=flat, delta=0.0))
    assert zero["lesion_dprime"] == 0.0
    d5 = lesion_visibility(an, _formation(c, lut=flat, delta=5.0))["lesion_dprime"]
    d10 = lesion_visibility(an, _formation(c, lut=flat, delta=10.0))["lesion_dprime"]
    assert d5 > 0
    assert d10 == pytest.approx(2 * d5, rel=1e-3)
    # halving the noise amplitude doubles d' (up to the rounding term)
    quiet = lesion_visibility(an, _formation(c, lut=flat, delta=5.0, noise=6.0))["lesion_dprime"]
    assert quiet == pytest.approx(2 * d5, rel=0.01)
    li = lesion_images(an, _formation(c, lut=flat, delta=5.0))
    assert li.lesion.any() and li.core.any() and li.gland.any()
    # the core lies up to delta below the gland, less on average (the infiltrative margin)
    assert -5.0 - 1e-4 <= float(li.signal.min()) < -2.5
    assert -5.0 < float(li.signal[li.core].mean()) < -2.0


def test_subject_truth_records_dprime_and_images_are_unchanged():
    plain = make_subject(21, matrix=128, lesion_type="pdac")
    seen = make_subject(21, matrix=128, lesion_type="pdac", observer=True)
    np.testing.assert_array_equal(plain.noncontrast, seen.noncontrast)
    np.testing.assert_array_equal(plain.contrast, seen.contrast)
    assert "lesion_dprime" not in plain.truth
    d = seen.truth["lesion_dprime"]
    assert np.isfinite(d) and d > 0
    assert np.isfinite(seen.truth["lesion_effective_contrast_hu"])
    # the same lesion in half the noise: d' about doubles
    quiet = make_subject(21, matrix=128, lesion_type="pdac", observer=True, noise_hu=5.0)
    loud = make_subject(21, matrix=128, lesion_type="pdac", observer=True, noise_hu=10.0)
    ratio = quiet.truth["lesion_dprime"] / loud.truth["lesion_dprime"]
    assert ratio == pytest.approx(2.0, rel=0.02)
    none = make_subject(22, matrix=128, lesion_type="none", observer=True)
    assert np.isnan(none.truth["lesion_dprime"])
    assert np.isnan(none.truth["lesion_effective_contrast_hu"])


def test_archive_truth_table_has_dprime_and_contrast(tmp_path):
    import pyarrow.parquet as pq

    from pdacscreen.io.phantom.archive import generate_archive

    summary = generate_archive(
        tmp_path / "a", studies=2, seed=41, matrix=128, pdac_fraction=1.0, workers=1
    )
    truth = pq.read_table(summary.truth_path).to_pandas()
    assert {"lesion_dprime", "lesion_effective_contrast_hu"} <= set(truth.columns)
    assert (truth["label"] == 1).all()
    assert (truth["lesion_dprime"] > 0).all()
    assert truth["lesion_effective_contrast_hu"].notna().all()


def test_sensitivity_by_band_counts_positives_per_band():
    from pdacscreen.engine.metrics import sensitivity_by_band

    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.95, np.nan, 0.99, 0.9])
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1])
    dprime = np.array([1.0, 1.5, 2.0, 3.9, 4.0, 9.0, 5.0, 1.0, np.nan])
    bands = sensitivity_by_band(scores, labels, dprime, threshold=0.5, edges=(2, 4), n_boot=200)
    assert list(bands) == ["< 2", "2-4", ">= 4", "unknown"]
    got = {k: (r.numerator, r.denominator) for k, r in bands.items()}
    # the negative (score 0.99) is ignored; a NaN score is not flagged; an edge goes up
    assert got == {"< 2": (1, 2), "2-4": (2, 2), ">= 4": (1, 3), "unknown": (1, 1)}
    assert bands["< 2"].value == 0.5
    assert bands["< 2"].ci_low <= 0.5 <= bands["< 2"].ci_high
    assert bands["2-4"].ci_low == bands["2-4"].ci_high == 1.0
    size = sensitivity_by_band(scores, labels, dprime * 10, threshold=0.5, edges=(20,), n_boot=0)
    assert list(size) == ["< 20", ">= 20", "unknown"]
    assert np.isnan(size["< 20"].ci_low)
    with pytest.raises(ValueError):
        sensitivity_by_band(scores, labels, dprime, threshold=0.5, edges=(4, 2))


def test_evaluate_reports_sensitivity_by_dprime_band_when_labels_have_it(tmp_path):
    import sys
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_store import make_synthetic_findings

    from pdacscreen.engine.metrics import sensitivity_by_band
    from pdacscreen.flows.evaluate import evaluate

    gen = make_synthetic_findings(tmp_path / "store", 300, seed=8, prevalence=0.3)
    labels = gen.truth.to_pandas()
    rng = np.random.default_rng(2)
    labels["lesion_dprime"] = np.where(labels["label"] == 1, rng.uniform(0, 8, len(labels)), np.nan)
    pq.write_table(pa.Table.from_pandas(labels, preserve_index=False), tmp_path / "l.parquet")
    res = evaluate(gen.store.root, tmp_path / "l.parquet", by=("size",), n_boot=50)
    bands = res.metrics["sensitivity_by_band"]
    assert set(bands) == {"dprime", "size_mm"}
    assert list(bands["dprime"]) == ["< 2", "2-4", ">= 4"]
    n_pos = sum(b["denominator"] for b in bands["dprime"].values())
    assert n_pos == res.metrics["case_level"]["n_positive"]
    # an independent count over the joined rows gives the same numerators
    findings = gen.store.read_findings()
    j = findings.merge(labels, on="study_instance_uid", suffixes=("", "_l"))
    j = j[j["pdac_probability"].notna()]
    ref = sensitivity_by_band(
        j["pdac_probability"].to_numpy(float),
        j["label"].to_numpy(int),
        j["lesion_dprime"].to_numpy(float),
        threshold=res.metrics["threshold"]["value"],
        edges=(2.0, 4.0),
        n_boot=0,
    )
    assert {k: v["numerator"] for k, v in bands["dprime"].items()} == {
        k: r.numerator for k, r in ref.items()
    }
