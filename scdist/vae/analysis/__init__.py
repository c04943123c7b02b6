"""MrVI post-training analyses: functions over a trained :class:`~scdist.vae.MrVI` model that
stream over cell chunks (each cell encoded once; counterfactual samples broadcast), optionally
on a Dask cluster (``client=``). The model's methods ``sample_distances``,
``differential_expression``, ``differential_abundance`` and ``admissibility`` call these.

Results are xarray objects; :func:`write_result` stores one under ``results/mrvi/<run>/<name>``.
"""
from __future__ import annotations

from .admissibility import admissibility
from .clustering import cluster_cells
from .da import differential_abundance, log_density_ratio
from .de import differential_expression
from .distances import cluster_samples, counterfactual_z, local_sample_distances, sample_distances
from .pipeline import run_analyses
from .results import read_result, write_result

__all__ = ["admissibility", "cluster_cells", "cluster_samples", "counterfactual_z", "differential_abundance",
           "differential_expression", "local_sample_distances", "log_density_ratio", "read_result", "run_analyses",
           "sample_distances", "write_result"]
