"""The sky: stars, galaxies, transients, variable stars and moving objects, with light curves.

A :class:`Scene` is drawn once per survey from a seed and is the truth every exposure is
rendered from. Brightness is in AB-like magnitudes; an instrument's filter zeropoint turns
them into electrons.

Light curves (``t`` in MJD):

- transient (supernova-like): zero before ``t0``; then
  ``f(t) = f_peak · (1 − e^{−(t−t0)/τ_rise}) · e^{−(t−t0)/τ_fall} / g_max``,
  so the peak flux is ``f_peak`` at ``t0 + τ_rise · ln(1 + τ_fall/τ_rise)``;
- variable star: ``m(t) = m0 + A · sin(2π (t − t_phase) / P)``;
- mover: a straight path on the sky at a constant rate, ``(ra, dec)`` at ``t_ref``.

Examples
--------
>>> import numpy as np
>>> from lazysky.simulator.scene import transient_flux_fraction
>>> float(transient_flux_fraction(np.array([0.0]), t0=1.0, tau_rise=2.0, tau_fall=20.0)[0])
0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from numpy.typing import NDArray

__all__ = ["KINDS", "Scene", "SceneSpec", "make_scene", "transient_flux_fraction"]

FloatArray = NDArray[np.float64]
KINDS = ("star", "galaxy", "transient", "variable", "mover")


@dataclass(frozen=True)
class SceneSpec:
    """What to put on the sky around a field centre (densities to the faint limit)."""

    ra_deg: float
    dec_deg: float
    radius_deg: float
    star_density_per_deg2: float
    star_mag_range: tuple[float, float]
    star_count_slope: float
    galaxy_density_per_deg2: float
    galaxy_mag_range: tuple[float, float]
    galaxy_count_slope: float
    n_transients: int
    transient_host_fraction: float
    transient_peak_mag_range: tuple[float, float]
    transient_window_mjd: tuple[float, float]
    n_variables: int
    n_movers: int
    mover_time_mjd: float
    inner_radius_deg: float


def transient_flux_fraction(
    t: FloatArray,
    *,
    t0: float | FloatArray,
    tau_rise: float | FloatArray,
    tau_fall: float | FloatArray,
) -> FloatArray:
    """Flux of a transient at times ``t`` as a fraction of its peak (0 before ``t0``)."""
    s = np.asarray(t, dtype=float) - t0
    g = (1.0 - np.exp(-np.maximum(s, 0.0) / tau_rise)) * np.exp(-np.maximum(s, 0.0) / tau_fall)
    s_peak = np.asarray(tau_rise) * np.log1p(np.asarray(tau_fall) / tau_rise)
    g_max = (1.0 - np.exp(-s_peak / tau_rise)) * np.exp(-s_peak / tau_fall)
    return np.asarray(np.where(s > 0, g / g_max, 0.0))


def _power_law_mags(
    rng: np.random.Generator, n: int, lo: float, hi: float, slope: float
) -> FloatArray:
    """Magnitudes with cumulative counts N(<m) ∝ 10^(slope·m) between lo and hi."""
    u = rng.uniform(0.0, 1.0, n)
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.asarray(np.log10(a + u * (b - a)) / slope)


def _positions_in_cap(
    rng: np.random.Generator, n: int, ra0: float, dec0: float, radius_deg: float
) -> tuple[FloatArray, FloatArray]:
    """``n`` positions uniform on the sphere within ``radius_deg`` of (ra0, dec0)."""
    cos_r = math.cos(math.radians(radius_deg))
    z = rng.uniform(cos_r, 1.0, n)  # uniform in solid angle around the pole
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    rho = np.sqrt(1.0 - z**2)
    v = np.stack([rho * np.cos(phi), rho * np.sin(phi), z])
    # rotate the pole onto (ra0, dec0)
    a, d = math.radians(ra0), math.radians(dec0)
    ry = np.array(
        [[math.sin(d), 0.0, math.cos(d)], [0.0, 1.0, 0.0], [-math.cos(d), 0.0, math.sin(d)]]
    )
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1]])
    x, y, zz = rz @ ry @ v
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    dec = np.degrees(np.arcsin(np.clip(zz, -1.0, 1.0)))
    return ra, dec


@dataclass(frozen=True)
class Scene:
    """Every source on the sky, with the parameters of its shape and light curve.

    ``table`` has one row per source: ``id, kind, ra, dec, mag`` (the base magnitude; the
    peak for transients), galaxy shape ``r_eff_arcsec, sersic_n, axis_ratio, pa_deg``,
    transient ``t0, tau_rise, tau_fall, host_id``, variable ``amplitude_mag, period_d,
    t_phase``, mover ``rate_ra_arcsec_h, rate_dec_arcsec_h, t_ref``. Unused entries are
    NaN (or -1 for ``host_id``).
    """

    table: Table

    def positions(self, mjd: float) -> tuple[FloatArray, FloatArray]:
        """RA and Dec of every source at ``mjd`` (movers move, the rest stay)."""
        t = self.table
        ra = np.array(t["ra"], dtype=float)
        dec = np.array(t["dec"], dtype=float)
        mov = np.asarray(t["kind"] == "mover")
        if mov.any():
            dt_h = (mjd - np.asarray(t["t_ref"])[mov]) * 24.0
            dec[mov] = dec[mov] + np.asarray(t["rate_dec_arcsec_h"])[mov] * dt_h / 3600.0
            cosd = np.cos(np.radians(dec[mov]))
            ra[mov] = (
                ra[mov] + np.asarray(t["rate_ra_arcsec_h"])[mov] * dt_h / 3600.0 / cosd
            ) % 360
        return ra, dec

    def magnitudes(self, mjd: float) -> FloatArray:
        """Magnitude of every source at ``mjd``; +inf where a transient is not (yet) there."""
        t = self.table
        mag = np.array(t["mag"], dtype=float)
        kind = np.asarray(t["kind"])
        tr = kind == "transient"
        if tr.any():
            frac = transient_flux_fraction(
                np.full(tr.sum(), mjd),
                t0=np.asarray(t["t0"])[tr],
                tau_rise=np.asarray(t["tau_rise"])[tr],
                tau_fall=np.asarray(t["tau_fall"])[tr],
            )
            with np.errstate(divide="ignore"):
                mag[tr] = np.where(
                    frac > 0, mag[tr] - 2.5 * np.log10(np.maximum(frac, 1e-300)), np.inf
                )
        var = kind == "variable"
        if var.any():
            phase = (
                2 * np.pi * (mjd - np.asarray(t["t_phase"])[var]) / np.asarray(t["period_d"])[var]
            )
            mag[var] = mag[var] + np.asarray(t["amplitude_mag"])[var] * np.sin(phase)
        return mag

    def point_like(self) -> NDArray[np.bool_]:
        """Sources drawn with the PSF alone (everything but galaxies)."""
        return np.asarray(self.table["kind"] != "galaxy")


def make_scene(spec: SceneSpec, rng: np.random.Generator) -> Scene:
    """Draw a scene: counts, magnitudes, shapes, light curves, all from ``rng``."""
    area = 2 * math.pi * (1 - math.cos(math.radians(spec.radius_deg))) * (180 / math.pi) ** 2
    n_star = int(rng.poisson(spec.star_density_per_deg2 * area))
    n_gal = int(rng.poisson(spec.galaxy_density_per_deg2 * area))
    nan = np.full

    s_ra, s_dec = _positions_in_cap(rng, n_star, spec.ra_deg, spec.dec_deg, spec.radius_deg)
    s_mag = _power_law_mags(rng, n_star, *spec.star_mag_range, spec.star_count_slope)
    g_ra, g_dec = _positions_in_cap(rng, n_gal, spec.ra_deg, spec.dec_deg, spec.radius_deg)
    g_mag = _power_law_mags(rng, n_gal, *spec.galaxy_mag_range, spec.galaxy_count_slope)
    r_eff = 0.6 * 10 ** (-0.1 * (g_mag - 22.0)) * rng.lognormal(0.0, 0.35, n_gal)
    disk = rng.uniform(0, 1, n_gal) < 0.6
    sersic_n = np.where(disk, rng.uniform(0.7, 1.5, n_gal), rng.uniform(2.0, 4.0, n_gal))
    axis_ratio = rng.uniform(0.25, 1.0, n_gal)
    pa = rng.uniform(0.0, 180.0, n_gal)

    kind = np.array(["star"] * n_star + ["galaxy"] * n_gal, dtype="<U9")
    ra = np.concatenate([s_ra, g_ra])
    dec = np.concatenate([s_dec, g_dec])
    mag = np.concatenate([s_mag, g_mag])
    cols: dict[str, FloatArray] = {
        "r_eff_arcsec": np.concatenate([nan(n_star, np.nan), r_eff]),
        "sersic_n": np.concatenate([nan(n_star, np.nan), sersic_n]),
        "axis_ratio": np.concatenate([nan(n_star, np.nan), axis_ratio]),
        "pa_deg": np.concatenate([nan(n_star, np.nan), pa]),
    }
    n = n_star + n_gal
    host_id = np.full(n, -1, dtype=np.int64)
    for name in (
        "t0",
        "tau_rise",
        "tau_fall",
        "amplitude_mag",
        "period_d",
        "t_phase",
        "rate_ra_arcsec_h",
        "rate_dec_arcsec_h",
        "t_ref",
    ):
        cols[name] = np.full(n, np.nan)

    # Variable stars: some moderately bright stars pulsate.
    cand = np.flatnonzero((kind == "star") & (mag > 16.5) & (mag < 22.0))
    var = rng.choice(cand, size=min(spec.n_variables, cand.size), replace=False)
    kind[var] = "variable"
    cols["amplitude_mag"][var] = rng.uniform(0.15, 0.6, var.size)
    cols["period_d"][var] = 10 ** rng.uniform(-0.7, 1.3, var.size)
    cols["t_phase"][var] = spec.transient_window_mjd[0] + rng.uniform(0, 30, var.size)

    # Transients: some on galaxies (near the centre), the rest alone.
    n_tr = spec.n_transients
    on_host = rng.uniform(0, 1, n_tr) < spec.transient_host_fraction
    t_ra, t_dec = _positions_in_cap(rng, n_tr, spec.ra_deg, spec.dec_deg, spec.inner_radius_deg)
    t_host = np.full(n_tr, -1, dtype=np.int64)
    gal_idx = np.flatnonzero((kind == "galaxy") & (mag < 24.0))
    if gal_idx.size:
        sep = np.hypot(
            (ra[gal_idx] - spec.ra_deg) * math.cos(math.radians(spec.dec_deg)),
            dec[gal_idx] - spec.dec_deg,
        )
        gal_idx = gal_idx[sep < spec.inner_radius_deg]
    for i in np.flatnonzero(on_host):
        if gal_idx.size == 0:
            break
        h = int(rng.choice(gal_idx))
        off = rng.normal(0.0, 0.5 * cols["r_eff_arcsec"][h], 2) / 3600.0
        t_dec[i] = dec[h] + off[1]
        t_ra[i] = (ra[h] + off[0] / math.cos(math.radians(dec[h]))) % 360.0
        t_host[i] = h
    t_lo, t_hi = spec.transient_window_mjd
    tr_cols = {
        "t0": rng.uniform(t_lo, t_hi, n_tr),
        "tau_rise": rng.uniform(1.0, 4.0, n_tr),
        "tau_fall": rng.uniform(10.0, 40.0, n_tr),
    }
    t_mag = rng.uniform(*spec.transient_peak_mag_range, n_tr)

    # Movers: a slow solar-system object crossing the field.
    n_mv = spec.n_movers
    m_ra, m_dec = _positions_in_cap(rng, n_mv, spec.ra_deg, spec.dec_deg, spec.inner_radius_deg)
    rate = rng.uniform(0.5, 3.0, n_mv)
    ang = rng.uniform(0.0, 2 * math.pi, n_mv)
    m_mag = rng.uniform(19.0, 21.5, n_mv)

    kind = np.concatenate([kind, np.full(n_tr, "transient"), np.full(n_mv, "mover")])
    ra = np.concatenate([ra, t_ra, m_ra])
    dec = np.concatenate([dec, t_dec, m_dec])
    mag = np.concatenate([mag, t_mag, m_mag])
    host_id = np.concatenate([host_id, t_host, np.full(n_mv, -1)])
    for name, values in cols.items():
        extra_t = tr_cols.get(name, np.full(n_tr, np.nan))
        extra_m = np.full(n_mv, np.nan)
        if name == "rate_ra_arcsec_h":
            extra_m = rate * np.cos(ang)
        elif name == "rate_dec_arcsec_h":
            extra_m = rate * np.sin(ang)
        elif name == "t_ref":
            extra_m = np.full(n_mv, spec.mover_time_mjd)
        cols[name] = np.concatenate([values, extra_t, extra_m])

    table = Table(
        {
            "id": np.arange(kind.size, dtype=np.int64),
            "kind": kind,
            "ra": ra,
            "dec": dec,
            "mag": mag,
            **cols,
            "host_id": host_id,
        }
    )
    table["ra"].unit = table["dec"].unit = "deg"
    table.meta["description"] = "lazysky simulator scene: every source and its light curve"
    return Scene(table)
