"""Synthetic two-center (or N-site) rectal MRI cohort with a known latent risk model.

`generate_cohort(out_dir, preset, seed, sites, progress)` writes site folders that follow the site
folder contract (clinical.csv, dicom/, masks/<patient_id>.nii.gz) and DIR/truth.json with each
patient's true risk and the oracle AUCs; `slmfed synth` wraps it.
"""
from .cohort import GENERATOR_VERSION, TRUTH_JSON, generate_cohort
from .model import TARGET_AUC, Population, RiskModel
from .scanners import PRESETS, SCANNERS, site_specs

__all__ = ["generate_cohort", "GENERATOR_VERSION", "TRUTH_JSON", "TARGET_AUC", "Population", "RiskModel",
           "PRESETS", "SCANNERS", "site_specs"]
