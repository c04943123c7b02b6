"""URSM: unified single-cell + bulk RNA-seq model (Zhu, Lei, Devlin & Roeder, AoAS 2018).

Gibbs-EM with an E-step of compiled numba kernels (exact Pólya-Gamma, binomial and S / (κ, τ) draws;
the polyagamma package as an option) and numpy for the per-sweep bookkeeping,
chains/blocks on Ray actors on request.
"""
from .fit import fit
from .params import Theta, naive_profile
from .simulate import UrsmSimulation, simulate, write_study

__all__ = ["fit", "simulate", "write_study", "UrsmSimulation", "Theta", "naive_profile"]
