"""The processing steps: masters, calibration, cosmic rays, background, grid, resample, stack.

Every step is a pure numpy kernel on one block plus a thin lazy wrapper on xarray/dask
(docs/pipeline.md). Nothing computes until the caller asks.

The names below are imported on first use (PEP 562): ``import lazysky.pipeline`` costs
nothing, and ``from lazysky.pipeline import stack`` imports only what ``stack`` needs
(so a one-shot ``lazysky coadd`` does not pay for the difference imaging, the PSF fits,
SEP or dask.distributed). Every name of :data:`__all__` is importable as before.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the type checkers and IDEs see; at run time see _LAZY
    from lazysky.pipeline._combine import clipped_mean, combine_chunks
    from lazysky.pipeline._isr import overscan_level
    from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
    from lazysky.pipeline._sections import parse_exposure, parse_section
    from lazysky.pipeline.background import (
        estimate_background,
        interpolate_mesh,
        mesh_levels,
        smooth_mesh,
        subtract_background,
    )
    from lazysky.pipeline.calibrate import (
        CalibratedPixels,
        calibrate_exposure,
        calibrate_pixels,
    )
    from lazysky.pipeline.cosmics import cosmic_ray_mask, flag_cosmic_rays, lacosmic_halo_px
    from lazysky.pipeline.detect import (
        SepSettings,
        Sources,
        detect,
        detect_difference,
        forced_photometry,
    )
    from lazysky.pipeline.difference import (
        FluxRatioWarning,
        difference,
        difference_files,
        fit_flux_ratio,
        write_difference_fits,
        zogy_pixels,
    )
    from lazysky.pipeline.grid import SkyGrid
    from lazysky.pipeline.masters import (
        DEFAULT_MAX_BLOCK_BYTES,
        bad_pixel_mask,
        bad_pixels,
        make_masters,
        master_bias,
        master_dark,
        master_flat,
    )
    from lazysky.pipeline.psf import (
        PSF,
        PsfFallbackWarning,
        estimate_psf,
        moffat_stamp,
        psf_per_tile,
    )
    from lazysky.pipeline.register import Registration, RegistrationError, register_frames
    from lazysky.pipeline.resample import (
        NoOverlapWarning,
        ResampledTile,
        detector_footprints,
        resample_exposure,
        resample_pixels,
    )
    from lazysky.pipeline.stack import stack, stack_pixels, write_coadd_fits

#: Public name -> the submodule that defines it (imported on first use).
_LAZY: dict[str, str] = {
    "clipped_mean": "_combine",
    "combine_chunks": "_combine",
    "overscan_level": "_isr",
    "MASK_DTYPE": "_mask",
    "MaskBit": "_mask",
    "parse_exposure": "_sections",
    "parse_section": "_sections",
    "estimate_background": "background",
    "interpolate_mesh": "background",
    "mesh_levels": "background",
    "smooth_mesh": "background",
    "subtract_background": "background",
    "CalibratedPixels": "calibrate",
    "calibrate_exposure": "calibrate",
    "calibrate_pixels": "calibrate",
    "cosmic_ray_mask": "cosmics",
    "flag_cosmic_rays": "cosmics",
    "lacosmic_halo_px": "cosmics",
    "FluxRatioWarning": "difference",
    "difference": "difference",
    "difference_files": "difference",
    "fit_flux_ratio": "difference",
    "write_difference_fits": "difference",
    "zogy_pixels": "difference",
    "SkyGrid": "grid",
    "DEFAULT_MAX_BLOCK_BYTES": "masters",
    "bad_pixel_mask": "masters",
    "bad_pixels": "masters",
    "make_masters": "masters",
    "master_bias": "masters",
    "master_dark": "masters",
    "master_flat": "masters",
    "PSF": "psf",
    "PsfFallbackWarning": "psf",
    "estimate_psf": "psf",
    "moffat_stamp": "psf",
    "psf_per_tile": "psf",
    "Registration": "register",
    "RegistrationError": "register",
    "register_frames": "register",
    "NoOverlapWarning": "resample",
    "ResampledTile": "resample",
    "detector_footprints": "resample",
    "resample_exposure": "resample",
    "resample_pixels": "resample",
    "stack": "stack",
    "stack_pixels": "stack",
    "write_coadd_fits": "stack",
}

__all__ = [
    "DEFAULT_MAX_BLOCK_BYTES",
    "MASK_DTYPE",
    "PSF",
    "CalibratedPixels",
    "FluxRatioWarning",
    "MaskBit",
    "NoOverlapWarning",
    "PsfFallbackWarning",
    "Registration",
    "RegistrationError",
    "ResampledTile",
    "SkyGrid",
    "bad_pixel_mask",
    "bad_pixels",
    "calibrate_exposure",
    "calibrate_pixels",
    "clipped_mean",
    "combine_chunks",
    "cosmic_ray_mask",
    "detector_footprints",
    "difference",
    "difference_files",
    "estimate_background",
    "estimate_psf",
    "fit_flux_ratio",
    "flag_cosmic_rays",
    "interpolate_mesh",
    "lacosmic_halo_px",
    "make_masters",
    "master_bias",
    "master_dark",
    "master_flat",
    "mesh_levels",
    "moffat_stamp",
    "overscan_level",
    "parse_exposure",
    "parse_section",
    "psf_per_tile",
    "register_frames",
    "resample_exposure",
    "resample_pixels",
    "smooth_mesh",
    "stack",
    "stack_pixels",
    "subtract_background",
    "write_coadd_fits",
    "write_difference_fits",
    "zogy_pixels",
]

# source detection (issue 6)
_LAZY.update({name: "detect" for name in ("SepSettings", "Sources", "detect",
                                          "detect_difference", "forced_photometry")})  # fmt: skip
__all__ += ["SepSettings", "Sources", "detect", "detect_difference", "forced_photometry"]


def __getattr__(name: str) -> Any:
    """A public name of :data:`_LAZY` or a submodule, imported on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule, as `import lazysky.pipeline.x` would
        try:
            return import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: ``stack``, ``difference`` and ``detect`` stay functions.

    They are functions named like the submodules that define them. Importing such a
    submodule binds it as an attribute of its package (Python's import system does
    ``setattr(package, "stack", module)``); before the imports were lazy, the package's
    ``from .stack import stack`` rebound the name to the function right after. This keeps
    it so: ``lazysky.pipeline.stack`` is the function whatever was imported first, and the
    submodule is still ``sys.modules["lazysky.pipeline.stack"]``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
