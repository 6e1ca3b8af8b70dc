"""The ``modgate`` command line. Commands parse arguments and hand over to the module
that owns the role; heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="modgate",
    help="Self-hosted image moderation: an ensemble of safety detectors, fused into verdicts "
    "over the 11 UnsafeBench categories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit codes: 0 ok, 1 --fail-on matched, 2 usage error (click's own), 3 infrastructure.
EXIT_FAIL_ON = 1
EXIT_INFRA = 3


class FailOn(StrEnum):
    never = "never"
    unsafe = "unsafe"
    review = "review"
    error = "error"


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (else $MODGATE_CONFIG).", show_default=False),
]


def _parse_models(models: list[str]) -> dict[str, str]:
    paths: dict[str, str] = {}
    for item in models:
        detector_id, sep, path = item.partition("=")
        if not sep or not detector_id or not path:
            raise typer.BadParameter(f"expected ID=PATH, got {item!r}", param_hint="--model")
        paths[detector_id.strip()] = path.strip()
    return paths


def _settings(config: Path | None, overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from worker.settings import load_settings

    try:
        return load_settings(config, **overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"modgate: invalid settings: {exc}", err=True)
        raise typer.Exit(EXIT_INFRA) from None


@app.command()
def scan(
    targets: Annotated[list[str], typer.Argument(help="Files, directories or s3://bucket/prefix URIs.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write JSONL verdicts here (default: stdout).")
    ] = None,
    detectors: Annotated[
        str | None, typer.Option("--detectors", "-d", help="Comma-separated detector ids to run.")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Weights for a detector: ID=PATH (repeatable).")
    ] = None,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 if any verdict is at least this bad.")
    ] = FailOn.never,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Moderate images in-process (no Redis): one JSON verdict per line, then a summary."""
    overrides: dict[str, Any] = {}
    det: dict[str, Any] = {}
    if detectors:
        det["enabled"] = [d.strip() for d in detectors.split(",") if d.strip()]
    if model:
        det["paths"] = _parse_models(model)
    if det:
        overrides["detectors"] = det
    settings = _settings(config, overrides)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.errors import ConfigError
    from worker.fetch import TargetError
    from worker.pipeline import Pipeline
    from worker.scan import run_scan

    console = Console(stderr=True)
    worst = {"safe": 0, "review": 1, "unsafe": 2}
    seen = {"worst": -1, "error": False}

    def track(verdict: Any) -> None:
        if verdict.status == "error":
            seen["error"] = True
        elif verdict.decision is not None:
            seen["worst"] = max(seen["worst"], worst[verdict.decision])

    try:
        pipeline = Pipeline(settings)
    except ConfigError as exc:
        console.print(f"[red]modgate: {exc}[/red]")
        raise typer.Exit(EXIT_INFRA) from None
    for detector_id, why in pipeline.detectors.skipped.items():
        console.print(f"[yellow]skipped detector {detector_id}: {why}[/yellow]")

    out = output.open("w") if output else sys.stdout
    try:
        with (
            pipeline,
            Progress(
                TextColumn("scanning"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=console,
                disable=not progress,
                transient=True,
            ) as bar,
        ):
            task = bar.add_task("scan", total=None, rate="")

            def on_verdict(verdict: Any) -> None:
                track(verdict)
                elapsed = bar.tasks[0].elapsed or 0.0
                done = bar.tasks[0].completed + 1
                bar.update(task, advance=1, rate=f"{done / elapsed:.1f} img/s" if elapsed else "")

            summary = run_scan(pipeline, targets, out, on_verdict=on_verdict)
    except (TargetError, FileNotFoundError) as exc:
        console.print(f"[red]modgate: {exc}[/red]")
        raise typer.Exit(EXIT_INFRA) from None
    finally:
        if output:
            out.close()

    _print_summary(console, summary)
    threshold = {FailOn.unsafe: 2, FailOn.review: 1}.get(fail_on)
    if (threshold is not None and seen["worst"] >= threshold) or (fail_on is FailOn.error and seen["error"]):
        raise typer.Exit(EXIT_FAIL_ON)


def _print_summary(console: Any, summary: Any) -> None:
    from rich.table import Table

    table = Table(title="modgate scan", show_header=True)
    table.add_column("outcome")
    table.add_column("images", justify="right")
    for decision in ("safe", "review", "unsafe"):
        table.add_row(decision, str(summary.decisions.get(decision, 0)))
    for code, count in sorted(summary.errors.items()):
        table.add_row(f"error: {code}", str(count))
    table.add_row("[bold]total[/bold]", f"[bold]{summary.images}[/bold]")
    console.print(table)
    console.print(f"{summary.images} images in {summary.seconds:.2f} s ({summary.images_per_s:.1f} images/s)")


models_app = typer.Typer(help="Where detector weights come from; fetch them into a model directory.")
app.add_typer(models_app, name="models")


def _detector_ids(settings: Any, detectors: str | None) -> list[str]:
    if detectors:
        return [d.strip() for d in detectors.split(",") if d.strip()]
    return settings.detectors.ids()


@models_app.command("list")
def models_list(
    detectors: Annotated[str | None, typer.Option("--detectors", "-d", help="Comma-separated ids.")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="ID=PATH (repeatable).")] = None,
    all_detectors: Annotated[
        bool, typer.Option("--all", help="Every known detector, not only enabled ones.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Each detector: where its weights would come from, present or not, size, revision."""
    from rich.console import Console
    from rich.table import Table

    from worker.models import SPECS, needed, status

    settings = _settings(config, {"detectors": {"paths": _parse_models(model or [])}})
    ids = list(SPECS) if all_detectors else needed(_detector_ids(settings, detectors))
    table = Table(title="modgate models")
    for column in ("detector", "present", "size", "revision", "source"):
        table.add_column(column)
    for detector_id in ids:
        if detector_id not in SPECS:
            table.add_row(detector_id, "?", "", "", "no weight spec (unknown detector)")
            continue
        st = status(detector_id, settings)
        size = f"{st.size / 1e6:.1f} MB" if st.size else ""
        table.add_row(detector_id, "yes" if st.present else "no", size, st.revision, st.source)
    Console(width=160).print(table)


@models_app.command("pull")
def models_pull(
    to: Annotated[Path, typer.Option("--to", help="Model directory to fill (MODGATE_DETECTORS__MODEL_DIR).")],
    detectors: Annotated[str | None, typer.Option("--detectors", "-d", help="Comma-separated ids.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Download every enabled detector's weights into DIR, for offline workers."""
    from worker.models import SPECS, needed, pull

    settings = _settings(config, {})
    failed = False
    for detector_id in needed(_detector_ids(settings, detectors)):
        if detector_id not in SPECS:
            continue
        try:
            for pulled_id, what in pull([detector_id], to):
                typer.echo(f"{pulled_id}: {what}")
        except Exception as exc:  # one unreachable source must not hide the others
            failed = True
            typer.echo(f"{detector_id}: FAILED: {type(exc).__name__}: {exc}", err=True)
    if failed:
        raise typer.Exit(EXIT_INFRA)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the verdict (v1)."""
    from worker.verdict import Verdict

    typer.echo(json.dumps(Verdict.model_json_schema(), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
