"""Survey simulator: realistic raw mosaics with known truth.

Everything downstream is measured against what this module writes: raw multi-extension
FITS exposures of a field revisited over epochs, with calibration frames, and for every
exposure a truth table of the sources on each detector and the cosmic rays that hit it.

Examples
--------
>>> from lazysky.simulator import SurveySpec, list_instruments
>>> list_instruments()
['ccdmosaic', 'roman', 'tiny']
>>> SurveySpec(instrument="roman", n_epochs=2).exposure_time
140.0
"""

from lazysky.simulator.detector import DetectorModel, detector_model, read_out
from lazysky.simulator.exposure import Pointing, detector_wcs, render_detector
from lazysky.simulator.instruments import Instrument, list_instruments, load_instrument
from lazysky.simulator.scene import Scene, make_scene, transient_flux_fraction
from lazysky.simulator.simulate import calibration_pointings, simulate_survey
from lazysky.simulator.survey import (
    ExposureInfo,
    SimulatedSurvey,
    SurveySpec,
    plan_exposures,
    survey_scene,
)

__all__ = [
    "DetectorModel",
    "ExposureInfo",
    "Instrument",
    "Pointing",
    "Scene",
    "SimulatedSurvey",
    "SurveySpec",
    "calibration_pointings",
    "detector_model",
    "detector_wcs",
    "list_instruments",
    "load_instrument",
    "make_scene",
    "plan_exposures",
    "read_out",
    "render_detector",
    "simulate_survey",
    "survey_scene",
    "transient_flux_fraction",
]
