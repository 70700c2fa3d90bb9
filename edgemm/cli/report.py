"""`edgemm report`: merge benchmark results into Markdown, CSV and PNG plots."""

from __future__ import annotations

from pathlib import Path

import typer

from edgemm.cli.common import console, err_console, report_errors


@report_errors
def report_command(
    results: list[Path] = typer.Argument(..., help="Result files written by `edgemm bench --out`.", show_default=False),
    out: Path = typer.Option(Path("bench-report"), "--out", help="Folder for report.md, results.csv and the PNG plots."),
) -> None:
    """Merge benchmark results from several machines or packages into one report."""
    from edgemm.report import build_report

    report = build_report(results, out)
    console.print(f"Report written to {report.markdown_path} ({report.row_count} rows in {report.csv_path.name})")
    for path in report.plot_paths:
        console.print(f"  plot: {path}")
    if report.plots_skipped_reason is not None:
        err_console.print(f"[yellow]warning:[/] plots skipped: {report.plots_skipped_reason}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
