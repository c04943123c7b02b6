"""Simulated population studies with known truth (CTMM variance components, MrVI sample
structure, URSM bulk mixtures). See :func:`simulate_study`."""
from .population import generate_chunk, make_design, simulate_study, truth_dataset

__all__ = ["simulate_study", "make_design", "generate_chunk", "truth_dataset"]
