"""`scdist ursm STORE [options]`: run the ``ursm`` stage on a study store."""
from __future__ import annotations

import typer

HELP = ("Fit URSM (joint single-cell + bulk model with dropouts) to STORE's cells/ and bulk/ and write "
        "A, W, dropout posteriors, imputed counts and the EM trace to results/ursm/<run>.\n\n"
        "Options are the keys of the spec's `ursm:` block; --engine ray runs chains/blocks on Ray actors.")


def register(app: typer.Typer) -> None:
    from ..cli import stage_verb

    stage_verb(app, "ursm", HELP)
