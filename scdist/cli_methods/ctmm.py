"""`scdist ctmm STORE [options]`: run the ``ctmm`` stage on a study store."""
from __future__ import annotations

import typer

HELP = ("Fit CTMM (Hom/IID/Free/Full; REML, ML or HE) to STORE's pseudobulk/ gene by gene and write "
        "variance components, fixed effects, log-likelihoods and p-values (Free vs Hom LRT/Wald/"
        "jackknife, Full vs Free LRT, mean differentiation) to results/ctmm/<run>.\n\n"
        "Options are the keys of the spec's `ctmm:` block, e.g. --models hom --models free "
        "--tests lrt --tests jackknife --random-effects batch. Finished gene blocks are skipped on rerun.")


def register(app: typer.Typer) -> None:
    from ..cli import stage_verb

    stage_verb(app, "ctmm", HELP)
