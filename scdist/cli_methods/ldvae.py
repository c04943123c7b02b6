"""`scdist ldvae STORE [options]`: run the ``ldvae`` stage on a study store."""
from __future__ import annotations

from typing import List, Optional

import typer

HELP = ("Train LDVAE (linear-decoder VAE) on STORE's cells and write latent factors and gene loadings "
        "to results/ldvae/<run>.\n\nOptions are the keys of the spec's `ldvae:` block; --num-workers > 1 "
        "or --use-gpu trains under Ray Train. A rerun resumes from the last checkpoint. The decoder has batch "
        "normalisation by default (the paper's and LinearSCVI's variant); --set 'options={decoder_batch_norm: false}' "
        "gives the plain linear decoder.")


def stage_verb(app: typer.Typer, name: str, help_: str) -> None:
    """Register `scdist <name> STORE --option ...` (one option per scalar key of the stage config)."""
    from ..cli import DASK_OPT, STORE_ARG, _fail, _run_single_stage
    from ..errors import ScdistError
    from ..plan.config_cli import parse_sets, with_config_options
    from ..plan.registry import stage_class

    cls = stage_class(name)

    def verb(config: dict, store: str = STORE_ARG,
             set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other config key: KEY=VALUE (YAML)."),
             dask_address: Optional[str] = DASK_OPT):
        try:
            merged = {**parse_sets(set_), **config}
        except ScdistError as exc:
            _fail(exc)
        _run_single_stage(name, store, merged, dask_address)

    verb.__name__ = name
    verb.__doc__ = help_
    app.command(name=name)(with_config_options(cls.Config, verb))


def register(app: typer.Typer) -> None:
    stage_verb(app, "ldvae", HELP)
