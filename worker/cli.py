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

# Exit codes: 0 ok, 1 --fail-on matched, 2 usage error (click's own; also an unusable
# --out / --output path), 3 infrastructure or configuration: invalid settings, and a bad
# policy or config file (YAML syntax, unknown detector or score) in every command.
EXIT_FAIL_ON = 1
EXIT_INFRA = 3
EXIT_CONFIG = EXIT_INFRA


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

    from modgate.errors import PolicyError
    from modgate.settings import load_settings

    try:
        return load_settings(config, **overrides)
    except PolicyError as exc:  # already names the file and line
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"modgate: invalid settings: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _bad_out(option: str, message: str) -> typer.Exit:
    typer.echo(f"modgate: {option}: {message}", err=True)
    return typer.Exit(2)  # a usage error, as click's own


def check_out_file(path: Path | None, option: str) -> None:
    """An output file must be creatable before any work starts (not after a whole fit)."""
    if path is None:
        return
    import os

    if path.is_dir():
        raise _bad_out(option, f"{path} is a directory, not a file")
    parent = path.parent
    if not parent.is_dir():
        raise _bad_out(option, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _bad_out(option, f"{path} is not writable")


def check_out_dir(path: Path, option: str) -> None:
    """An output directory: created now if missing, refused if it is a file."""
    if path.exists() and not path.is_dir():
        raise _bad_out(option, f"{path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _bad_out(option, f"cannot create {path}: {exc.strerror or exc}") from None


def _detector_overrides(detectors: str | None, model: list[str] | None) -> dict[str, Any]:
    det: dict[str, Any] = {}
    if detectors:
        det["enabled"] = [d.strip() for d in detectors.split(",") if d.strip()]
    if model:
        det["paths"] = _parse_models(model)
    return {"detectors": det} if det else {}


DetectorsOpt = Annotated[
    str | None, typer.Option("--detectors", "-d", help="Comma-separated detector ids to run.")
]
ModelOpt = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="Weights for a detector: ID=PATH (repeatable).")
]


@app.command()
def scan(
    targets: Annotated[list[str], typer.Argument(help="Files, directories or s3://bucket/prefix URIs.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write JSONL verdicts here (default: stdout).")
    ] = None,
    detectors: DetectorsOpt = None,
    model: ModelOpt = None,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 if any verdict is at least this bad.")
    ] = FailOn.never,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    bank: Annotated[
        list[str] | None,
        typer.Option(
            "--bank",
            help="A hash bank for this run: NAME=FILE[:ACTION[:CATEGORY[:KIND]]] (repeatable; action "
            "unsafe, category illegal_activity, kind from the file: 32 hex digits md5, 64 pdq).",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Say why each skipped detector was skipped.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Moderate images in-process (no Redis): one JSON verdict per line, then a summary."""
    check_out_file(output, "--output")
    from worker.tools.scan import scan_banks

    try:
        banks = scan_banks(bank or [])
    except ValueError as exc:  # BankFormatError, or a spec pydantic refuses
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    settings = _settings(config, _detector_overrides(detectors, model))
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        _quiet_skips()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from modgate.errors import ConfigError
    from worker.ingest.fetch import TargetError
    from worker.tools.scan import run_scan, scan_pipeline

    console = Console(stderr=True)
    worst = {"safe": 0, "review": 1, "unsafe": 2}
    seen = {"worst": -1, "error": False}

    def track(verdict: Any) -> None:
        if verdict.status == "error":
            seen["error"] = True
        if verdict.decision is not None:  # an error the policy counts as review, too
            seen["worst"] = max(seen["worst"], worst[verdict.decision])

    try:
        pipeline = scan_pipeline(settings, banks)
    except ConfigError as exc:
        console.print(f"[red]modgate: {exc}[/red]")
        raise typer.Exit(EXIT_INFRA) from None
    _report_detectors(console, pipeline.detectors, verbose)

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
    _print_next_steps(console, output)
    threshold = {FailOn.unsafe: 2, FailOn.review: 1}.get(fail_on)
    if (threshold is not None and seen["worst"] >= threshold) or (fail_on is FailOn.error and seen["error"]):
        raise typer.Exit(EXIT_FAIL_ON)


def _quiet_skips() -> None:
    """Leave out the loader's warning per skipped detector: ``_report_detectors`` says it in
    one line (``-v`` brings the reasons back)."""

    class _NoSkips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("detector %s skipped")

    logging.getLogger("worker.detectors").addFilter(_NoSkips())


def _report_detectors(console: Any, loaded: Any, verbose: bool) -> None:
    """One line on which detectors ran and how many were skipped (without weights, mostly:
    a first run has only the ones whose weights ship in packages), and where to look."""
    ran = ", ".join(d.id for d in loaded.detectors)
    skipped = loaded.skipped
    if not skipped:
        console.print(f"detectors: {ran}")
        return
    console.print(
        f"detectors: {ran} ran; {len(skipped)} skipped for lack of weights or config "
        f"({', '.join(skipped)}): `modgate models list` shows where each one's weights come from "
        "and `modgate models pull` fetches them" + ("" if verbose else "; -v says why"),
        soft_wrap=True,
    )
    if verbose:
        for detector_id, why in skipped.items():
            console.print(f"[yellow]  {detector_id}: {why}[/yellow]", soft_wrap=True)


def _print_next_steps(console: Any, output: Path | None) -> None:
    where = str(output) if output else "VERDICTS.jsonl (stdout here; --output writes a file)"
    if output:
        console.print(f"verdicts written to {output}", soft_wrap=True)
    console.print(
        "next: `modgate eval LABELS.csv --verdicts " + where + " --out report/` measures them against "
        "your labels; `modgate worker` moderates S3 uploads from the Redis queue (docs/worker.md)",
        soft_wrap=True,
    )


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

    from worker.detectors.weights import SPECS, needed, status

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
    from worker.detectors.weights import SPECS, needed, pull

    settings = _settings(config, {})
    failed = False
    for detector_id in needed(_detector_ids(settings, detectors)):
        if detector_id not in SPECS:
            continue
        try:
            for pulled_id, what in pull([detector_id], to, settings):
                typer.echo(f"{pulled_id}: {what}")
        except Exception as exc:  # one unreachable source must not hide the others
            failed = True
            typer.echo(f"{detector_id}: FAILED: {type(exc).__name__}: {exc}", err=True)
    if failed:
        raise typer.Exit(EXIT_INFRA)


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Queues to consume, comma-separated.")
    ] = "modgate,modgate.webhooks",
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="Messages in flight (default 2 × batch.max_batch).")
    ] = None,
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Celery node name.")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
    detectors: DetectorsOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Consume the queues: moderate S3 keys (loading models first) and deliver webhooks.

    SIGTERM drains: no new messages, in-flight ones get worker.drain_timeout_s, the rest go
    back to the queue. `-Q modgate.webhooks` runs a CPU-only webhook dispatcher."""
    overrides = _detector_overrides(detectors, model)
    if concurrency:
        overrides["worker"] = {"concurrency": concurrency}
    settings = _settings(config, overrides)

    from worker.service import celery_app

    app_ = celery_app.create_app(settings)
    celery_app.set_app(app_)
    argv = [
        "worker",
        "--queues",
        queues,
        "--pool",
        "threads",
        "--concurrency",
        str(settings.worker.threads(settings.batch.max_batch)),
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    app_.worker_main(argv)
    # worker_main drops the worker's exit status: a worker that could not load its models,
    # or that stopped on an error, must not exit 0 (the orchestrator restarts it).
    status = celery_app.exit_status()
    if status:
        raise typer.Exit(EXIT_INFRA if celery_app.start_failed() else status)


@app.command("serve-inference")
def serve_inference(
    socket: Annotated[
        Path | None, typer.Option("--socket", help="Unix socket to listen on (else inference.socket).")
    ] = None,
    detectors: DetectorsOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Own the models and the GPU for the ingest processes of this node (one per GPU).

    `modgate worker` processes with MODGATE_INFERENCE__SOCKET set send their images here:
    the GPU then sees full batches from all of them. SIGTERM stops it."""
    overrides = _detector_overrides(detectors, model)
    if socket is not None:
        overrides["inference"] = {"socket": socket}
    settings = _settings(config, overrides)

    from modgate.errors import ConfigError
    from worker.device.engine_server import serve
    from worker.observe.logs import setup_logging

    setup_logging(settings.worker.log_format)
    try:
        status = serve(settings)
    except ConfigError as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_INFRA) from None
    if status:
        raise typer.Exit(status)


webhooks_app = typer.Typer(help="Webhook dead letters: list them, replay them.")
app.add_typer(webhooks_app, name="webhooks")


@webhooks_app.command("dead")
def webhooks_dead(
    limit: Annotated[int, typer.Option(help="At most this many entries.")] = 100,
    config: ConfigOpt = None,
) -> None:
    """List dead-lettered deliveries (JSON lines: entry id, url, attempts, last error)."""
    import redis

    from modgate import keys

    settings = _settings(config, {})
    client = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    for entry_id, fields in client.xrange(keys.WEBHOOK_DEAD_STREAM, count=limit):
        fields.pop("delivery", None)
        typer.echo(json.dumps({"entry_id": entry_id, **fields}))


@webhooks_app.command("replay")
def webhooks_replay(
    entry: Annotated[
        list[str] | None, typer.Option("--id", help="Dead-letter entry id (repeatable).")
    ] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Send dead-lettered deliveries again, each as a fresh retry chain."""
    if not entry and not all_entries:
        raise typer.BadParameter("give --id ENTRY (repeatable) or --all")
    import redis

    from worker.delivery.webhooks import Dispatcher
    from worker.service import celery_app

    settings = _settings(config, {})
    client = redis.Redis.from_url(settings.redis.url)
    app_ = celery_app.create_app(settings)
    dispatcher = Dispatcher(client, settings.webhook, celery_app.schedule_webhook(app_))
    replayed = dispatcher.replay(entry or None)
    typer.echo(f"replayed {len(replayed)} dead letter(s)")


banks_app = typer.Typer(
    help="Hash banks in Redis (PDQ, MD5, SHA-256), shared by every worker: add, remove, list, "
    "import, export, and add the hashes of a verdict (take-down feedback)."
)
app.add_typer(banks_app, name="banks")


class BankKindChoice(StrEnum):
    pdq = "pdq"
    md5 = "md5"
    sha256 = "sha256"


class BankActionChoice(StrEnum):
    unsafe = "unsafe"
    review = "review"
    safe = "safe"


BankNameArg = Annotated[str, typer.Argument(help="Bank name (letters, digits, _ . -).", show_default=False)]
BankKindOpt = Annotated[
    BankKindChoice | None,
    typer.Option("--kind", help="Hash kind; needed to create a bank (fixed once created)."),
]
BankCategoryOpt = Annotated[
    str | None, typer.Option("--category", help="Category a match flags (default illegal_activity).")
]
BankActionOpt = Annotated[
    BankActionChoice | None, typer.Option("--action", help="What a match does (default unsafe).")
]
BankDistanceOpt = Annotated[
    int | None,
    typer.Option("--max-distance", help="PDQ: match within this many bits (default and most: 31)."),
]
BankAllowPdqOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-pdq/--no-allow-pdq", help="A safe bank's PDQ matches allow-list too (default off)."
    ),
]


class _BankUsage(Exception):
    """A command-line mistake: exit 2 with the message."""


def _bank_errors() -> Any:
    """Turn bank problems into messages and exit codes: a malformed hash or file, an unknown
    bank, a kind that cannot change → 2; Redis unreachable, a bank that does not validate,
    a bound reached → 3. Never a traceback."""
    import contextlib

    @contextlib.contextmanager
    def guard() -> Any:
        import redis

        from modgate.banks import BankFormatError
        from worker.judge.banks import BankStoreError

        try:
            yield
        except (BankFormatError, _BankUsage) as exc:
            typer.echo(f"modgate: {exc}", err=True)
            raise typer.Exit(2) from None
        except BankStoreError as exc:
            typer.echo(f"modgate: {exc}", err=True)
            raise typer.Exit(2 if exc.usage else EXIT_INFRA) from None
        except redis.exceptions.RedisError as exc:
            typer.echo(f"modgate: Redis: {exc}", err=True)
            raise typer.Exit(EXIT_INFRA) from None

    return guard()


def _bank_store(config: Path | None) -> Any:
    import redis

    from worker.judge.banks import BankStore

    settings = _settings(config, {})
    return settings, BankStore(redis.Redis.from_url(settings.redis.url), settings.banks)


def _bank_spec(
    store: Any,
    name: str,
    kind: BankKindChoice | None,
    category: str | None,
    action: BankActionChoice | None,
    max_distance: int | None,
    allow_pdq: bool | None,
    rewrite: bool = False,
) -> Any:
    """The bank's spec, creating the bank or applying the options given. ``rewrite`` (import
    --replace) also takes over a bank that does not validate, recounting its hashes."""
    from pydantic import ValidationError

    from modgate.banks import BankSpec
    from worker.judge.banks import refusal

    state = store.state(name)
    given = {
        "category": category,
        "action": action.value if action else None,
        "max_distance": max_distance,
        "allow_pdq": allow_pdq,
    }
    given = {k: v for k, v in given.items() if v is not None}
    base: dict[str, Any] = {"name": name}
    if state is not None and state.spec is not None:
        base = state.spec.model_dump()
        if kind is not None and kind.value != state.spec.kind:
            raise _BankUsage(f"bank {name!r} holds {state.spec.kind} hashes; a bank's kind cannot change")
    elif kind is None:
        if state is None:
            raise _BankUsage(f"no bank named {name!r}: give --kind pdq|md5|sha256 to create it")
        from worker.judge.banks import BankStoreError

        raise BankStoreError(refusal(name, state.problem))
    if kind is not None:
        base["kind"] = kind.value
    if state is not None and state.problem is not None and not rewrite:
        from worker.judge.banks import BankStoreError

        raise BankStoreError(refusal(name, state.problem))
    if state is not None and base.get("kind") != "pdq" and "max_distance" not in given:
        base.pop("max_distance", None)
    try:
        spec = BankSpec.model_validate({**base, **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "bank"
        raise _BankUsage(f"bank {name!r}: {where}: {first['msg']}") from None
    repair = state is not None and state.problem is not None
    if state is None or repair or spec != state.spec:
        store.put_spec(spec, recount=repair)
    return spec


@banks_app.command("add")
def banks_add(
    name: BankNameArg,
    hashes: Annotated[
        list[str] | None,
        typer.Argument(help="Hex hashes (none: create the bank or change its options)."),
    ] = None,
    kind: BankKindOpt = None,
    category: BankCategoryOpt = None,
    action: BankActionOpt = None,
    max_distance: BankDistanceOpt = None,
    allow_pdq: BankAllowPdqOpt = None,
    note: Annotated[str, typer.Option("--note", help="A note kept with each hash (never an image).")] = "",
    quality: Annotated[
        int | None, typer.Option("--quality", help="PDQ quality of the hashes (below 50: refused).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Add hashes to a bank (created with --kind if new); every worker matches them within
    seconds. The options change the bank's category, action, distance."""
    _, store = _bank_store(config)
    with _bank_errors():
        from worker.judge.banks import entries_from_hashes

        if kind is not None and hashes:  # a malformed hash is refused before anything is written
            entries_from_hashes(kind.value, hashes, note, quality)
        spec = _bank_spec(store, name, kind, category, action, max_distance, allow_pdq)
        entries = entries_from_hashes(spec.kind, hashes or [], note, quality)
        added, _ = store.add(name, entries)
        state = store.state(name)
        typer.echo(
            f"bank {name}: {added} added, {len(entries) - added} already there; "
            f"{state.count} {spec.kind} hashes, version {state.version}"
        )


@banks_app.command("remove")
def banks_remove(
    name: BankNameArg,
    hashes: Annotated[list[str] | None, typer.Argument(help="Hex hashes to remove.")] = None,
    drop: Annotated[bool, typer.Option("--all", help="Remove the whole bank and its hashes.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Remove hashes from a bank (they stop matching in every worker within seconds), or the
    bank itself with --all."""
    if bool(hashes) == drop:
        raise typer.BadParameter("give hashes to remove, or --all to remove the bank")
    _, store = _bank_store(config)
    with _bank_errors():
        from worker.judge.banks import entries_from_hashes

        if drop:
            if not store.drop(name):
                raise _BankUsage(f"no bank named {name!r}")
            typer.echo(f"bank {name}: removed")
            return
        spec = store.spec(name)
        wanted = [e.hash for e in entries_from_hashes(spec.kind, hashes or [])]
        removed, _ = store.remove(name, wanted)
        state = store.state(name)
        typer.echo(
            f"bank {name}: {removed} removed, {len(wanted) - removed} were not in it; "
            f"{state.count} {spec.kind} hashes, version {state.version}"
        )


@banks_app.command("list")
def banks_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per bank.")] = False,
    config: ConfigOpt = None,
) -> None:
    """The banks in Redis: kind, what a match does, size, version, and whether each
    validates (a bank that does not is refused by workers, which keep their last copy)."""
    _, store = _bank_store(config)
    with _bank_errors():
        states = store.states()
    rows = []
    for name, state in sorted(states.items()):
        spec = state.spec
        rows.append(
            {
                "name": name,
                "kind": spec.kind if spec else None,
                "category": spec.category if spec else None,
                "action": spec.action if spec else None,
                "max_distance": spec.max_distance if spec else None,
                "allow_pdq": spec.allow_pdq if spec else None,
                "hashes": state.stored,
                "version": state.version,
                "valid": state.problem is None,
                **({"problem": state.problem} if state.problem else {}),
            }
        )
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no banks")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hash banks")
    for column in ("name", "kind", "category", "action", "max_distance", "hashes", "version", "state"):
        table.add_column(
            column, justify="right" if column in ("max_distance", "hashes", "version") else "left"
        )
    for row in rows:
        table.add_row(
            *(
                "" if row[c] is None else str(row[c])
                for c in ("name", "kind", "category", "action", "max_distance", "hashes", "version")
            ),
            "ok" if row["valid"] else f"REFUSED: {row['problem']}",
        )
    Console(width=160).print(table)


@banks_app.command("import")
def banks_import(
    name: BankNameArg,
    file: Annotated[Path, typer.Argument(help="Plain text, CSV (hash,note,quality) or ThreatExchange CSV.")],
    kind: BankKindOpt = None,
    category: BankCategoryOpt = None,
    action: BankActionOpt = None,
    max_distance: BankDistanceOpt = None,
    allow_pdq: BankAllowPdqOpt = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Make the bank hold exactly the file (also rewrites a bank that does not validate).",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a bank file's hashes to a bank (created with --kind if new). The whole file is
    checked first: a malformed line is reported with its number and nothing is written."""
    _, store = _bank_store(config)
    with _bank_errors():
        from modgate.banks import parse_bank_file

        state = store.state(name)
        file_kind = kind.value if kind else (state.spec.kind if state and state.spec else None)
        if file_kind is None:
            raise _BankUsage(f"no bank named {name!r}: give --kind pdq|md5|sha256 to create it")
        entries = parse_bank_file(file, file_kind)
        spec = _bank_spec(store, name, kind, category, action, max_distance, allow_pdq, rewrite=replace)
        if replace:
            added, removed = store.replace(name, entries)
        else:
            (added, _), removed = store.add(name, entries), 0
        state = store.state(name)
        typer.echo(
            f"bank {name}: {len(entries)} hashes read from {file}, {added} added, {removed} removed; "
            f"{state.count} {spec.kind} hashes, version {state.version}"
        )


@banks_app.command("export")
def banks_export(
    name: BankNameArg,
    out: Annotated[Path | None, typer.Option("--out", help="Write here (default: stdout).")] = None,
    config: ConfigOpt = None,
) -> None:
    """A bank as CSV (hash,note,quality), which `modgate banks import` reads back."""
    check_out_file(out, "--out")
    _, store = _bank_store(config)
    with _bank_errors():
        from modgate.banks import format_bank
        from worker.judge.banks import refusal

        state = store.state(name)
        if state is None:
            raise _BankUsage(f"no bank named {name!r}")
        if state.problem is not None:  # still exported: it may be the way to salvage it
            typer.echo(f"modgate: warning: {refusal(name, state.problem)}", err=True)
        text = format_bank(store.entries(name))
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"bank {name}: {text.count(chr(10)) - 1} hashes written to {out}", err=True)


@banks_app.command("add-from-verdict")
def banks_add_from_verdict(
    name: BankNameArg,
    verdict_ids: Annotated[
        list[str] | None, typer.Argument(help="Verdict ids still on the results stream in Redis.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="Verdicts (JSONL) instead: all of them, or those named."),
    ] = None,
    kind: BankKindOpt = None,
    category: BankCategoryOpt = None,
    action: BankActionOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Take-down feedback: add the hashes of the bank's kind (MD5, SHA-256, or PDQ: the
    displayed frame's and, for an EXIF-rotated file, the file's) of each verdict to a bank,
    so re-uploads of a removed image match. Exit 1 if a verdict was not
    found or had no such hash."""
    import re

    if not verdict_ids and from_file is None:
        raise typer.BadParameter("give verdict ids, or --from-file VERDICTS.jsonl")
    settings, store = _bank_store(config)
    with _bank_errors():
        from modgate.takedown import add_verdicts, find_verdict, read_verdict_lines

        for vid in verdict_ids or []:
            if not re.fullmatch(r"[0-9a-f]{32}", vid):
                raise _BankUsage(f"not a verdict id (32 lowercase hex digits): {vid[:40]!r}")
        _bank_spec(store, name, kind, category, action, None, None)
        problems: list[str] = []
        verdicts: list[dict[str, Any]] = []
        if from_file is not None:
            wanted = set(verdict_ids or [])
            verdicts = [v for v in read_verdict_lines(from_file) if not wanted or v.get("id") in wanted]
            missing = wanted - {v.get("id") for v in verdicts}
            problems += [f"verdict {vid}: not in {from_file}" for vid in sorted(missing)]
        else:
            for vid in verdict_ids or []:
                found = find_verdict(store.redis, settings.results.stream, vid)
                if found is None:
                    problems.append(f"verdict {vid}: not on the results stream (trimmed, or never published)")
                else:
                    verdicts.append(found)
        result = add_verdicts(store, name, verdicts)
        problems += result.skipped
        for problem in problems:
            typer.echo(f"modgate: skipped {problem}", err=True)
        typer.echo(
            f"bank {name}: {result.added} added, {result.already} already there ({result.verdicts} verdicts)"
        )
    if problems:
        raise typer.Exit(1)


@app.command()
def health(
    hostname: Annotated[
        str | None, typer.Option("--hostname", help="Whose heartbeat (default: this host).")
    ] = None,
    ready: Annotated[bool, typer.Option("--ready", help="Exit 1 unless a worker is ready.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Print the heartbeats of the worker processes on a host (JSON lines: state, detectors
    and each detector's device under "devices"); exit 1 if there are none (or, with
    --ready, if none is ready)."""
    import socket

    import redis

    from worker.observe.health import read_heartbeats

    settings = _settings(config, {})
    states = read_heartbeats(redis.Redis.from_url(settings.redis.url), hostname or socket.gethostname())
    if not states:
        typer.echo("no heartbeat", err=True)
        raise typer.Exit(1)
    for state in states:
        typer.echo(json.dumps(state))
    if ready and not any(state.get("ready") for state in states):
        raise typer.Exit(1)


@app.command()
def enqueue(
    target: Annotated[str, typer.Argument(help="s3://bucket/prefix to backfill.")],
    suffix: Annotated[
        str | None,
        typer.Option("--suffix", help="Only keys ending in one of these (comma-separated, any case)."),
    ] = None,
    min_size: Annotated[
        int | None, typer.Option("--min-size", help="Skip objects below this many bytes.")
    ] = None,
    max_size: Annotated[
        int | None, typer.Option("--max-size", help="Skip objects above this many bytes.")
    ] = None,
    modified_since: Annotated[
        str | None, typer.Option("--modified-since", help="ISO date/time; older objects are skipped.")
    ] = None,
    start_after: Annotated[
        str | None, typer.Option("--start-after", help="Resume after this key (the last one a run printed).")
    ] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="At most this many keys per second.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Keys a message (default worker.max_items).")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant")] = None,
    callback_url: Annotated[
        str | None, typer.Option("--callback-url", help="Webhook for these verdicts.")
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Named policy (MODGATE_POLICIES).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List and count, enqueue nothing.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress line on stderr.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Backfill: enqueue every object under an S3 prefix (ETag and size from the listing)."""
    import time
    from datetime import UTC, datetime

    from rich.console import Console

    from modgate.settings import ProducerRoute
    from producers.backfill import BackfillStopped, Filters, backfill
    from producers.enqueuer import Enqueuer
    from worker.ingest.fetch import Fetcher, TargetError

    settings = _settings(config, {})
    try:
        bucket, prefix = Fetcher.parse_s3_uri(target)
    except TargetError as exc:
        raise typer.BadParameter(str(exc), param_hint="TARGET") from None
    since = None
    if modified_since:
        try:
            since = datetime.fromisoformat(modified_since)
        except ValueError:
            raise typer.BadParameter(
                "expected an ISO date, e.g. 2026-11-01", param_hint="--modified-since"
            ) from None
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
    filters = Filters(
        suffixes=tuple(x.strip().lower() for x in suffix.split(",") if x.strip()) if suffix else (),
        min_size=min_size,
        max_size=max_size,
        modified_since=since,
    )
    route = None
    if tenant or callback_url or policy:
        route = ProducerRoute(
            bucket=bucket, prefix=prefix, tenant=tenant, callback_url=callback_url, policy=policy
        )
    console = Console(stderr=True)
    enqueuer = None if dry_run else Enqueuer(settings)

    started = time.perf_counter()

    def show(result: Any) -> None:
        if progress:
            per_s = result.enqueued / max(1e-6, time.perf_counter() - started)
            line = f"listed {result.listed}, enqueued {result.enqueued} ({per_s:.0f} keys/s)"
            line += f", last {result.last_key}"
            console.print(line, end="\r", highlight=False)

    try:
        result = backfill(
            enqueuer,
            Fetcher(settings.s3).client,
            bucket,
            prefix,
            filters,
            start_after=start_after,
            rate=rate,
            route=route,
            dry_run=dry_run,
            progress=show,
            batch_size=batch_size or settings.worker.max_items,
        )
    except BackfillStopped as exc:
        done = exc.result
        resume = f"resume with --start-after {done.last_key!r}" if done.last_key else "nothing was enqueued"
        console.print(
            f"\n[red]modgate: backfill stopped after {done.enqueued} keys: {exc}; {resume}[/red]",
            highlight=False,
        )
        raise typer.Exit(EXIT_INFRA) from None
    verb = "would enqueue" if dry_run else "enqueued"
    console.print(
        f"\nlisted {result.listed}, matched {result.matched}, {verb} {result.enqueued} keys in "
        f"{result.messages} messages, {result.seconds:.1f} s; last key: {result.last_key}",
        highlight=False,
    )
    typer.echo(
        json.dumps(
            {
                "listed": result.listed,
                "matched": result.matched,
                "enqueued": result.enqueued,
                "messages": result.messages,
                "last_key": result.last_key,
                "dry_run": dry_run,
            }
        )
    )


listen_app = typer.Typer(help="Consume S3 event notifications and enqueue the created objects.")
app.add_typer(listen_app, name="listen")


@listen_app.command("sqs")
def listen_sqs(
    queue_url: Annotated[str, typer.Argument(help="SQS queue URL receiving S3 (or SNS/EventBridge) events.")],
    config: ConfigOpt = None,
) -> None:
    """Long-poll SQS; delete each message only after its keys are on the Redis queue."""
    import signal

    from producers.enqueuer import Enqueuer
    from producers.sqs import SqsListener
    from worker.observe.logs import setup_logging

    settings = _settings(config, {})
    setup_logging(settings.worker.log_format)
    if settings.producer.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.producer.metrics_port)
    listener = SqsListener(queue_url, Enqueuer(settings))

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger("producers.sqs").info("signal %d: finishing the current batch", signum)
        listener.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener.run()


@app.command("serve-events")
def serve_events(
    host: Annotated[str, typer.Option("--host")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port")] = 8080,
    config: ConfigOpt = None,
) -> None:
    """HTTP receiver for S3/MinIO event notifications: POST /events, GET /healthz, /openapi.json."""
    import uvicorn

    from producers.receiver import create_app, http_protocol
    from worker.observe.logs import setup_logging

    settings = _settings(config, {})
    setup_logging(settings.worker.log_format)
    try:
        api = create_app(settings)
    except ValueError as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_INFRA) from None
    uvicorn.run(
        api,
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=10,
        http=http_protocol(settings.receiver),
    )


class RandomSize(StrEnum):
    full = "full"
    tiny = "tiny"


@app.command()
def bench(
    directory: Annotated[
        Path | None, typer.Argument(help="Images to use (default: a generated 0.3–12 MP JPEG mix).")
    ] = None,
    detectors: DetectorsOpt = None,
    model: ModelOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 or fp16.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Max batch (batch.max_batch).")] = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Duration of each measurement.")] = 20.0,
    count: Annotated[int, typer.Option("--count", help="Generated images (without DIR).")] = 24,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Full-size models with random weights (offline).")
    ] = False,
    random_size: Annotated[RandomSize, typer.Option("--random-size", hidden=True)] = RandomSize.full,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Measure modgate on this machine: end to end vs pure model images/s, per-stage ms, the
    limit set by unavoidable work and the fraction reached, GPU memory and TFLOP/s."""
    from modgate.errors import ConfigError
    from worker.tools import bench as bench_mod

    overrides = _detector_overrides(detectors, model)
    runtime = {k: v for k, v in (("device", device), ("precision", precision)) if v}
    overrides |= {"runtime": runtime} if runtime else {}
    overrides |= {"batch": {"max_batch": batch}} if batch else {}
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    settings = bench_mod.settings_for(
        lambda o: _settings(config, o), overrides, random_size.value if random_init else None
    )
    if directory is not None:
        paths, source = bench_mod.image_files(directory), str(directory)
    else:
        out = settings.detectors.cache_dir / "bench-images"
        paths, source = bench_mod.jpeg_mix(out, count), f"generated JPEG mix ({out})"
    if not paths:
        typer.echo(f"modgate: no images in {directory}", err=True)
        raise typer.Exit(EXIT_INFRA)
    try:
        result = bench_mod.run_bench(settings, paths, seconds, source)
    except ConfigError as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_INFRA) from None
    typer.echo(json.dumps(result, indent=2) if as_json else bench_mod.format_table(result))


EXIT_USAGE = 2


class ReviewAs(StrEnum):
    unsafe = "unsafe"
    safe = "safe"


class FusionChoice(StrEnum):
    max = "max"
    logistic = "logistic"


def _policy_settings(
    config: Path | None, policy: Path | None, overrides: dict[str, Any] | None = None
) -> Any:
    """Settings whose policy is ``--policy`` (else MODGATE_POLICY_FILE, else the default)."""
    return _settings(config, {**(overrides or {}), **({"policy_file": policy} if policy else {})})


def _scan_labelled(settings: Any, label_set: Any, output: Path, progress: bool) -> Path:
    """``eval`` without --verdicts: the labelled images through ``modgate scan``'s code."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from modgate.errors import ConfigError
    from worker.quality.evaluate import scan_labelled
    from worker.tools.scan import scan_pipeline

    console = Console(stderr=True)
    try:
        pipeline = scan_pipeline(settings)
    except ConfigError as exc:
        console.print(f"[red]modgate: {exc}[/red]")
        raise typer.Exit(EXIT_INFRA) from None
    _report_detectors(console, pipeline.detectors, verbose=False)
    columns = (TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with pipeline, Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("scan", total=len(label_set.rows))
        return scan_labelled(pipeline, label_set, output, on_verdict=lambda _v: bar.advance(task))


def _print_input_issues(report: dict[str, Any]) -> None:
    from worker.quality.report import summary_notes

    for note in summary_notes(report):
        typer.echo(f"note: {note}", err=True)
    for what, issue in report["unmatched"].items():
        if issue["count"]:
            examples = ", ".join(issue["examples"])
            typer.echo(f"note: {what.replace('_', ' ')}: {issue['count']} (e.g. {examples})", err=True)
    for code, count in report["errors"].items():
        typer.echo(f"note: {count} labelled image(s) have error verdicts ({code}), left out", err=True)


@app.command("eval")
def eval_(
    labels: Annotated[Path, typer.Argument(help="Labels: CSV or JSONL (UnsafeBench or multi-label style).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json, PNG plots, report.html.")],
    verdicts: Annotated[
        Path | None,
        typer.Option("--verdicts", help="Stored verdicts (JSONL): reuse their scores, run no model."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Re-aggregate the stored scores under this policy file.")
    ] = None,
    review_as: Annotated[
        ReviewAs, typer.Option("--review-as", help="Count review decisions as this.")
    ] = ReviewAs.unsafe,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples (0 = none).", min=0)
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    plots: Annotated[bool, typer.Option(help="Draw the PNG plots.")] = True,
    detectors: DetectorsOpt = None,
    model: ModelOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while scanning.")] = True,
    config: ConfigOpt = None,
) -> None:
    """Measure verdicts against labels: precision/recall/F1/FPR, per-category AUROC and AP beside
    each detector, per split, with bootstrap intervals. Without --verdicts the images are scanned
    first (verdicts kept in OUT/verdicts.jsonl)."""
    check_out_dir(out, "--out")
    settings = _policy_settings(config, policy, _detector_overrides(detectors, model))
    from rich.console import Console
    from rich.table import Table

    from worker.quality.evaluate import run_eval
    from worker.quality.labels import LabelsError, read_labels
    from worker.quality.replay import read_verdicts
    from worker.quality.report import SUMMARY_HEADERS, summary_rows

    try:
        label_set = read_labels(labels)
        if verdicts is None:
            verdicts = _scan_labelled(settings, label_set, out / "verdicts.jsonl", progress)
        stored = read_verdicts(verdicts)
        report = run_eval(label_set, stored, settings.policy, out, review_as.value, bootstrap, seed, plots)
    except LabelsError as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    table = Table(title=f"modgate eval: {report['n']} images, policy {report['policy_version']}")
    for header in SUMMARY_HEADERS:
        table.add_column(header, justify="left" if not header else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    Console(width=140).print(table)
    _print_input_issues(report)
    typer.echo(f"report: {out / 'report.json'}, {out / 'report.html'}")


@app.command("replay")
def replay_(
    verdicts: Annotated[Path, typer.Argument(help="Stored verdicts (JSONL).")],
    policy: Annotated[Path, typer.Option("--policy", help="The policy to re-aggregate them under.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the new verdicts (JSONL) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """What a policy change would do, without running a model: decision transitions and
    per-category flag rates before/after. Error verdicts pass through unchanged."""
    check_out_file(out, "--out")
    settings = _policy_settings(config, policy)
    import contextlib

    from rich.console import Console
    from rich.table import Table

    from worker.quality.labels import LabelsError
    from worker.quality.replay import OUTCOMES, read_verdicts, replay, summary_json

    try:
        stored = read_verdicts(verdicts)
        with out.open("w") if out else contextlib.nullcontext() as handle:
            summary = replay(stored, settings.policy, handle)
    except LabelsError as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        typer.echo(summary_json(summary))
        return
    console = Console(width=140)
    before = ", ".join(sorted(summary.policy_before))
    table = Table(title=f"decisions: policy {before} (rows) → {summary.policy_after} (columns)")
    table.add_column("before \\ after")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right")
    for a in OUTCOMES:
        table.add_row(a, *(str(summary.transitions.get((a, b), 0)) for b in OUTCOMES))
    console.print(table)
    rates = Table(title=f"flag rate per category ({summary.ok} ok verdicts)")
    for column in ("category", "before", "after", "change"):
        rates.add_column(column, justify="left" if column == "category" else "right")
    for name, (b, a) in summary.flag_rates().items():
        rates.add_row(name, f"{b:.2%}", f"{a:.2%}", f"{a - b:+.2%}")
    console.print(rates)
    if out:
        typer.echo(f"new verdicts: {out}")


@app.command("calibrate")
def calibrate_(
    labels: Annotated[Path, typer.Argument(help="Labels: CSV or JSONL (UnsafeBench or multi-label style).")],
    verdicts: Annotated[
        Path, typer.Option("--verdicts", help="Stored verdicts (JSONL) of the labelled images.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Write the calibrated policy YAML here.")],
    target: Annotated[str, typer.Option("--target", help="f1, precision=P or fpr=F.")] = "f1",
    fusion: Annotated[FusionChoice, typer.Option("--fusion", help="Weighted max, or a fitted logistic.")] = (
        FusionChoice.max
    ),
    review_recall: Annotated[
        float, typer.Option("--review-recall", help="Flagged + review reach this recall on the labels.")
    ] = 0.95,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.", min=2)] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    min_positives: Annotated[
        int, typer.Option("--min-positives", help="Fewer positives: the category keeps its base rule.")
    ] = 20,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Base policy (default: the active one).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Fit per-category thresholds (and, with --fusion logistic, evidence weights) to labelled
    verdicts; write a complete policy YAML loadable with MODGATE_POLICY_FILE."""
    check_out_file(out, "--out")
    settings = _policy_settings(config, policy)
    from worker.quality.calibrate import CalibrationError, Target, calibrate
    from worker.quality.labels import LabelsError, join, read_labels
    from worker.quality.replay import read_verdicts

    try:
        goal = Target.parse(target)
        label_set = read_labels(labels)
        joined = join(label_set, read_verdicts(verdicts))
        result = calibrate(
            joined, settings.policy, goal, fusion.value, review_recall, folds, seed, min_positives
        )
    except (LabelsError, CalibrationError) as exc:
        typer.echo(f"modgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    out.write_text(result.yaml(sources=f"labels {labels.name}, verdicts {verdicts.name}"))
    for fit in result.fits.values():
        typer.echo(fit.describe())
    for what, issue in (
        ("labels without verdict", joined.labels_without_verdict),
        ("verdicts without label", joined.verdicts_without_label),
    ):
        if issue.count:
            typer.echo(f"note: {what}: {issue.count} (e.g. {', '.join(issue.examples)})", err=True)
    if joined.error_codes:
        typer.echo(f"note: error verdicts left out: {dict(joined.error_codes)}", err=True)
    typer.echo(f"policy {result.policy.version} written to {out}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the verdict (v1), with the webhook envelope (headers, event
    types, body) under ``x-modgate-webhook`` and the body of a ``verdict.reviewed`` event
    (a reviewer's decision, from the review console) under ``x-modgate-reviewed-event``."""
    from modgate.envelope import ENVELOPE
    from modgate.review import ReviewedEvent
    from modgate.verdict import SCHEMA_REVISION, Verdict

    document = Verdict.model_json_schema()
    revision = f"Schema v1, revision {SCHEMA_REVISION}."
    document["description"] = f"{document.get('description', '')} {revision}".strip()
    document["x-modgate-webhook"] = ENVELOPE
    document["x-modgate-reviewed-event"] = ReviewedEvent.model_json_schema()
    typer.echo(json.dumps(document, indent=2))


@app.command()
def console(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    config: ConfigOpt = None,
) -> None:
    """The review console: a web app where moderators decide ``review`` verdicts
    (docs/review.md). Reviewers log in with MODGATE_CONSOLE__TOKENS or an auth proxy."""
    from console.__main__ import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(host, port, config=config)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
