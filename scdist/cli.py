"""The ``scdist`` command.

Core verbs live here (run, plan, simulate, ingest, info, status). Method verbs (ctmm, ursm,
ldvae, mrvi), ``report`` and ``submit`` come from ``scdist/cli_methods/<name>.py`` modules
exposing ``register(app)``; a verb whose module does not exist is simply not offered.
Errors scdist raises for bad input (:class:`scdist.errors.ScdistError`) are printed as one
line naming the field and the fix, with exit status 2.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ScdistError

app = typer.Typer(
    name="scdist",
    help=("Distributed batch compute for population-scale single-cell RNA-seq.\n\n"
          "A pipeline spec (YAML) names a study store and stages; `scdist run SPEC` executes "
          "them on Dask (an embedded LocalCluster unless given an address) and Ray, "
          "skipping work a previous run finished. Start with "
          "`scdist run examples/quickstart.yaml`."),
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

SPEC_ARG = typer.Argument(..., help="Pipeline spec: a YAML file (see examples/quickstart.yaml).")
STORE_ARG = typer.Argument(..., help="Study store: a path ending in .zarr or an fsspec URL.")
DASK_OPT = typer.Option(None, "--dask-address",
                        help="Dask scheduler to use (tcp://host:8786); overrides SCDIST_DASK_ADDRESS and "
                             "the spec's dask.address. Default: an embedded LocalCluster.")
RAY_OPT = typer.Option(None, "--ray-address",
                       help="Ray head to use (host:6379 or ray://...); overrides SCDIST_RAY_ADDRESS and the "
                            "spec's ray.address. Default: a local Ray started only if a Ray stage runs.")
STORE_OPT = typer.Option(None, "--store", help="Study store to use instead of the spec's `store`.")


def _fail(exc: ScdistError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.command()
def run(spec: Path = SPEC_ARG, store: Optional[str] = STORE_OPT,
        dask_address: Optional[str] = DASK_OPT, ray_address: Optional[str] = RAY_OPT,
        plain: bool = typer.Option(False, "--plain", help="Log lines instead of progress bars "
                                                          "(automatic when not a terminal or CI=true).")):
    """Run a pipeline spec: every stage in dependency order, skipping finished work.

    Stages already completed with the same config (and the same inputs) are skipped; an
    interrupted stage resumes from its completed chunks. Progress is shown per stage.
    """
    from .plan.runner import run as run_spec

    try:
        result = run_spec(spec, store=store, dask_address=dask_address, ray_address=ray_address,
                          rich=False if plain else None)
    except ScdistError as exc:
        _fail(exc)
    ran = ", ".join(f"{s} ({result.seconds[s]:.1f}s)" for s in result.ran) or "nothing"
    typer.echo(f"run {result.run_id}: ran {ran}; skipped {', '.join(result.skipped) or 'nothing'}")
    typer.echo(f"store: {result.store}")


@app.command()
def plan(spec: Path = SPEC_ARG, store: Optional[str] = STORE_OPT,
         dask_address: Optional[str] = DASK_OPT, ray_address: Optional[str] = RAY_OPT,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")):
    """Show what `scdist run SPEC` would do, without doing it.

    Prints the stages in execution order with their engine, chunking, resources, what each
    needs and writes, and what is already done in the store.
    """
    from .plan.runner import plan as plan_spec

    try:
        graph = plan_spec(spec, store=store, dask_address=dask_address, ray_address=ray_address)
    except ScdistError as exc:
        _fail(exc)
    typer.echo(json.dumps(graph.to_dict(), indent=1, default=str) if as_json else graph.render())


def _run_single_stage(stage: str, store: str, config: dict, dask_address: str | None,
                      ray_address: str | None = None) -> None:
    from .plan.runner import run as run_spec

    spec = {"store": store, "stages": {stage: config}}
    try:
        result = run_spec(spec, dask_address=dask_address, ray_address=ray_address)
    except ScdistError as exc:
        _fail(exc)
    verb = "done" if result.ran else "already done (same config), skipped"
    typer.echo(f"{stage} {verb}: {result.store}")


def stage_verb(app: typer.Typer, name: str, help_: str) -> None:
    """Register `scdist <name> STORE --option ...` running stage ``name`` alone on STORE.

    One option per scalar (or list-of-scalar) key of the stage's Config, ``--set KEY=VALUE``
    for the others; method modules in ``scdist/cli_methods`` can call this too. Nothing is
    registered when the stage's module is not part of this install.
    """
    from .plan.config_cli import parse_sets, with_config_options
    from .plan.registry import STAGES, stage_class

    if importlib.util.find_spec(STAGES[name].split(":")[0]) is None:
        return
    cls = stage_class(name)

    def verb(config: dict, store: str = STORE_ARG,
             set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other config key: KEY=VALUE (YAML)."),
             dask_address: Optional[str] = DASK_OPT, ray_address: Optional[str] = RAY_OPT):
        try:
            merged = {**parse_sets(set_), **config}
        except ScdistError as exc:
            _fail(exc)
        _run_single_stage(name, store, merged, dask_address, ray_address)

    verb.__name__ = name
    verb.__doc__ = help_
    app.command(name=name)(with_config_options(cls.Config, verb))


def _register_core_stage_verbs() -> None:
    stage_verb(app, "simulate", (
        "Simulate a multi-donor study with known truth into STORE (the `simulate` stage).\n\n"
        "Options are the keys of the spec's `simulate:` block. Rerunning with the same options "
        "does nothing; other options rewrite the study."))
    stage_verb(app, "ingest", (
        "Ingest an AnnData (.h5ad or .zarr) and optional bulk counts into STORE (the `ingest` stage).\n\n"
        "Options are the keys of the spec's `ingest:` block: the input path and the obs keys "
        "holding donor, cell type, batch and donor covariates. Bad input fails before "
        "anything is written."))


def _show(compute, render, store: str, as_json: bool) -> None:
    try:
        data = compute(store)
    except ScdistError as exc:
        _fail(exc)
    typer.echo(json.dumps(data, indent=1, default=str) if as_json else render(data))


@app.command()
def info(store: str = STORE_ARG,
         as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """Summarise a study store: donors, cells, genes, cell types, stages done, results."""
    from .plan.storeinfo import render_info, store_info

    _show(store_info, render_info, store, as_json)


@app.command()
def status(store: str = STORE_ARG,
           as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the runs recorded in a store and, per stage, chunks done / total, timings and failures."""
    from .plan.storeinfo import render_status, store_status

    _show(store_status, render_status, store, as_json)


def _register_plugin_verbs() -> None:
    """Verbs from scdist/cli_methods/<name>.py (method verbs, report, submit)."""
    from . import cli_methods

    for mod in sorted(m.name for m in pkgutil.iter_modules(cli_methods.__path__)):
        if mod.startswith("_"):
            continue
        module = importlib.import_module(f"{cli_methods.__name__}.{mod}")
        register = getattr(module, "register", None)
        if callable(register):
            register(app)


_register_core_stage_verbs()
_register_plugin_verbs()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except ScdistError as exc:  # raised by a plugin verb
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; run the same command again to resume",
                   err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
