"""The processing steps: masters, calibration, cosmic rays, background, grid, resample, stack.

Every step is a pure numpy kernel on one block plus a thin lazy wrapper on xarray/dask
(docs/pipeline.md). Nothing computes until the caller asks.
"""

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
from lazysky.pipeline.calibrate import CalibratedPixels, calibrate_exposure, calibrate_pixels
from lazysky.pipeline.cosmics import cosmic_ray_mask, flag_cosmic_rays, lacosmic_halo_px
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
from lazysky.pipeline.psf import PSF, PsfFallbackWarning, estimate_psf, moffat_stamp, psf_per_tile
from lazysky.pipeline.register import Registration, RegistrationError, register_frames
from lazysky.pipeline.resample import (
    NoOverlapWarning,
    ResampledTile,
    detector_footprints,
    resample_exposure,
    resample_pixels,
)
from lazysky.pipeline.stack import stack, stack_pixels, write_coadd_fits

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
from lazysky.pipeline.detect import (
    SepSettings,
    Sources,
    detect,
    detect_difference,
    forced_photometry,
)

__all__ += ["SepSettings", "Sources", "detect", "detect_difference", "forced_photometry"]
