"""`scdist report STORE [--out FILE]`: a self-contained HTML report of a study store."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from ..cli import STORE_ARG, _fail
    from ..errors import ScdistError

    @app.command()
    def report(store: str = STORE_ARG,
               out: Optional[str] = typer.Option(None, "--out", "-o",
                                                 help="HTML file to write (default <store>.report.html).")):
        """Write an HTML report (PNG figures embedded) of what was run on STORE and what it found:
        run metadata, CTMM variance components, QQ plots and top genes, LDVAE loadings and
        latents, MrVI sample distances with dendrograms and DE/DA summaries, URSM proportions
        and profiles."""
        from ..report import write_report

        try:
            path = write_report(store, out)
        except ScdistError as exc:
            _fail(exc)
        typer.echo(f"report: {path}")
