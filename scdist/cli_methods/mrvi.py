"""`scdist mrvi STORE [options]`: run the ``mrvi`` stage on a study store."""
from __future__ import annotations

import typer

from .ldvae import stage_verb

HELP = ("Train MrVI on STORE's cells (sample = --sample-key, default donor) and write u and z per cell to "
        "results/mrvi/<run>, with the model for the post-training analyses.\n\nOptions are the keys of the "
        "spec's `mrvi:` block; --num-workers > 1 or --use-gpu trains under Ray Train. A rerun resumes from "
        "the last checkpoint.\n\nPost-training analyses: --set 'analyses={distances: {groupby: celltype}, "
        "de: {covariates: [disease]}}' (keys: distances, sample_clusters, cell_clusters, admissibility, de, da); "
        "each result goes to results/mrvi/<run>/<analysis>.")


def register(app: typer.Typer) -> None:
    stage_verb(app, "mrvi", HELP)
