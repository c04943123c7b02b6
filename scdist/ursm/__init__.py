"""URSM: unified single-cell + bulk RNA-seq model (Zhu, Lei, Devlin & Roeder, AoAS 2018).

Gibbs-EM with a vectorised E-step (numpy + polyagamma, compiled numba kernels for the inner loops),
chains/blocks on Ray actors on request.
"""
from .fit import fit
from .params import Theta, naive_profile
from .simulate import UrsmSimulation, simulate, write_study

__all__ = ["fit", "simulate", "write_study", "UrsmSimulation", "Theta", "naive_profile"]
