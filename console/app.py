"""The console's HTTP surface: ``create_app(settings)`` builds the FastAPI app.

Pages are rendered on the server (Jinja2, templates/); the only client-side behaviour is
CSS (blur, click-to-reveal, greyscale), so every page is served with a CSP that allows no
script at all. Every route but /healthz, /login, /openapi.json and the stylesheet needs a
reviewer (console/auth.py, checked before a body is read); every form carries a CSRF token,
checked before anything is done. Decisions go through ``modgate.review.decide`` (first
decision wins; it records, queues the ``verdict.reviewed`` webhooks, applies the S3 action).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from starlette.responses import StreamingResponse

from console import banks as banks_api
from console import dashboard as dashboard_mod
from console.auth import LOGIN_COOKIE, SESSION_COOKIE, Authenticator, AuthMiddleware, Identity, identity_of
from console.images import IMAGE_HEADERS, ImageError, locate, open_image, s3_client
from console.queue import Filters, ReviewQueue
from modgate import review, takedown
from modgate.settings import Settings

log = logging.getLogger(__name__)

HERE = FilePath(__file__).resolve().parent
PAGE_HEADERS = {
    # No script anywhere: the console's behaviour is forms and CSS.
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
VerdictId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
Csrf = Annotated[str, Form(max_length=256)]
Category = Annotated[str | None, Query(max_length=64)]
Tenant = Annotated[str | None, Query(max_length=128)]
Age = Annotated[float | None, Query(ge=0, le=24 * 366)]


def _filters(
    category: Category = None, tenant: Tenant = None, max_age_h: Age = None, min_age_h: Age = None
) -> Filters:
    """The queue filters of a page's query (an empty field is no filter)."""
    return Filters(category or None, tenant or None, max_age_h, min_age_h)


QueryFilters = Annotated[Filters, Depends(_filters)]


def webhook_sender(redis_url: str) -> Callable[[Any], None]:
    """``send_task`` for ``modgate.review.decide``: a Delivery onto the webhook queue, sent by
    name through a Celery app that knows nothing of the worker (as producers send tasks)."""
    from modgate.contract import task_sender_app
    from modgate.envelope import celery_sender

    app = task_sender_app(redis_url, "modgate-console")
    return celery_sender(app)


def _decision_record(decision: review.ReviewDecision) -> dict[str, Any]:
    """A ReviewDecision as the console shows and remembers it."""
    return {
        "reviewer": decision.reviewer,
        "decision": decision.decision,
        "category": decision.category,
        "at": datetime.fromtimestamp(decision.at, UTC).isoformat(timespec="seconds"),
    }


def _safe_next(target: str | None) -> str:
    # Only a path of this site: never an absolute URL or a scheme-relative //host.
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(
    settings: Settings,
    *,
    redis: Any = None,
    s3: Any = None,
    send_task: Callable[[Any], None] | None = None,
    background: bool = True,
) -> FastAPI:
    import redis as redis_lib

    console = settings.console
    client = redis if redis is not None else redis_lib.Redis.from_url(settings.redis.url)
    queue = ReviewQueue(client, console, stream=settings.results.stream)
    auth = Authenticator(console)
    clients: dict[str, Any] = {"s3": s3, "send": send_task}
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), trim_blocks=True
    )
    categories = sorted(settings.policy.categories)

    def s3_for_images() -> Any:
        if clients["s3"] is None:
            clients["s3"] = s3_client(settings)
        return clients["s3"]

    def sender() -> Callable[[Any], None]:
        if clients["send"] is None:
            clients["send"] = webhook_sender(settings.redis.url)
        return clients["send"]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_pump_forever()) if background else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pump_forever() -> None:
        delay = console.poll_s
        next_resume = 0.0
        while True:
            try:
                read = await asyncio.to_thread(queue.pump)
                delay = console.poll_s if read == 0 else 0.0
            except RedisError as exc:
                log.warning("review queue: cannot read the verdict stream: %s", exc)
                delay = min(max(delay * 2, console.poll_s), 30.0)
            if time.monotonic() >= next_resume:
                # Decisions whose process died after recording them: finished here, so an
                # unsafe decision never stays recorded but not carried out.
                next_resume = time.monotonic() + min(10.0, settings.review.resume_after_s / 2)
                try:
                    await asyncio.to_thread(resume_decisions)
                except Exception as exc:  # Redis, S3 or the broker down: the next round retries
                    log.warning("review: cannot finish interrupted decisions yet: %s", exc)
            await asyncio.sleep(delay)

    def find_verdict(verdict_id: str) -> dict[str, Any] | None:
        item = queue.item(verdict_id)
        if item is not None:
            return item.verdict
        return takedown.find_verdict(client, settings.results.stream, verdict_id)

    def resume_decisions() -> None:
        for result in review.resume_incomplete(
            client, settings, find_verdict, s3=s3_for_images(), send_task=sender()
        ):
            queue.mark_decided(result.decision.verdict_id, _decision_record(result.decision))

    app = FastAPI(
        title="modgate console",
        version="1",
        description="Human review of modgate verdicts (docs/review.md).",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(AuthMiddleware, authenticator=auth)

    @app.middleware("http")
    async def page_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> Response:
        log.warning("redis error on %s: %s", request.url.path, exc)
        if request.url.path.startswith("/api/"):
            return banks_api.problem(503, "redis_unavailable", "Redis is unavailable; try again shortly")
        return PlainTextResponse("Redis is unavailable; try again shortly", status_code=503)

    @app.exception_handler(KombuOperationalError)
    async def broker_down(request: Request, exc: KombuOperationalError) -> Response:
        # The decision is recorded but its webhooks could not be queued: the item stays in the
        # queue, and the same reviewer deciding the same again finishes it (review.decide resumes).
        log.warning("webhook queue unreachable on %s: %s", request.url.path, exc)
        return message(
            request,
            503,
            "Not finished",
            "Your decision is recorded but its webhooks could not be queued. "
            "Decide the same again in a moment to finish it.",
        )

    def render(name: str, request: Request, status: int = 200, **context: Any) -> HTMLResponse:
        identity: Identity | None = request.scope.get("state", {}).get("identity")
        context.setdefault("reviewer", identity.reviewer if identity else None)
        context.setdefault("csrf", auth.csrf_token(identity) if identity else "")
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    def message(request: Request, status: int, title: str, text: str, **context: Any) -> HTMLResponse:
        return render("message.html", request, status, title=title, text=text, **context)

    def forbidden(request: Request) -> HTMLResponse:
        return message(request, 403, "Refused", "The form's CSRF token is missing or wrong; reload the page.")

    def decided_page(request: Request, record: dict[str, Any]) -> HTMLResponse:
        return render("decided.html", request, 409, record=record)

    # -- open ----------------------------------------------------------------------------

    @app.get("/healthz", response_class=JSONResponse, summary="Liveness (no data)")
    def healthz() -> JSONResponse:
        try:
            client.ping()
        except RedisError:
            return JSONResponse({"status": "redis unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/static/console.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response((HERE / "templates" / "console.css").read_bytes(), media_type="text/css")

    @app.get("/login", response_class=HTMLResponse, summary="Login form")
    def login_form(request: Request, next: Annotated[str | None, Query(max_length=2048)] = None) -> Response:
        if request.scope.get("state", {}).get("identity") is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        nonce = auth.login_nonce()
        response = render("login.html", request, next=_safe_next(next), login_csrf=auth.login_csrf(nonce))
        auth.set_cookie(response, LOGIN_COOKIE, nonce, max_age=600)
        return response

    @app.post("/login", response_class=HTMLResponse, summary="Log in with a reviewer token")
    def login(
        request: Request,
        token: Annotated[str, Form(max_length=1024)],
        csrf: Csrf = "",
        next: Annotated[str | None, Form(max_length=2048)] = None,
    ) -> Response:
        if not auth.login_csrf_ok(request.cookies.get(LOGIN_COOKIE), csrf):
            return forbidden(request)
        reviewer = auth.token_owner(token)
        if reviewer is None:
            nonce = auth.login_nonce()
            response = render(
                "login.html",
                request,
                401,
                next=_safe_next(next),
                login_csrf=auth.login_csrf(nonce),
                error="That token is not a reviewer's token.",
            )
            auth.set_cookie(response, LOGIN_COOKIE, nonce, max_age=600)
            return response
        response = RedirectResponse(_safe_next(next), status_code=303)
        auth.set_cookie(response, SESSION_COOKIE, auth.make_session(reviewer), console.session_max_age_s)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    # -- behind authentication ------------------------------------------------------------

    @app.post("/logout", response_class=HTMLResponse, summary="End the session")
    def logout(request: Request, csrf: Csrf = "") -> Response:
        if not auth.csrf_ok(identity_of(request), csrf):
            return forbidden(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse, summary="The review queue")
    def queue_page(request: Request, filters: QueryFilters) -> Response:
        identity = identity_of(request)
        queue.pump()  # what arrived since the background round, bounded by console.read_batch
        items = queue.page(identity.reviewer, filters)
        query = {k: v for k, v in vars(filters).items() if v not in (None, "")}
        return render(
            "queue.html",
            request,
            items=items,
            depth=queue.depth(),
            filters=filters,
            categories=categories,
            next_url="/next" + ("?" + urlencode(query) if query else ""),
        )

    @app.get("/next", response_class=HTMLResponse, summary="Open the next item for this reviewer")
    def next_item(request: Request, filters: QueryFilters) -> Response:
        identity = identity_of(request)
        queue.pump()
        for item in queue.page(identity.reviewer, filters, 20):
            if queue.lease(item.verdict_id, identity.reviewer) is None:
                return RedirectResponse(f"/items/{quote(item.verdict_id)}", status_code=303)
        return RedirectResponse("/", status_code=303)

    @app.get("/items/{verdict_id}", response_class=HTMLResponse, summary="One queued verdict")
    def item_page(request: Request, verdict_id: VerdictId) -> Response:
        identity = identity_of(request)
        raw = queue.raw_item(verdict_id)
        if raw is None:  # a link that came faster than the background read: read once now
            queue.pump()
            raw = queue.raw_item(verdict_id)
        if raw is not None and raw.get("decided"):
            return decided_page(request, raw)
        item = queue.item(verdict_id)
        if item is None:
            return message(request, 404, "Not in the queue", "This verdict is not waiting for review.")
        earlier = review.decided(client, verdict_id)
        if earlier is not None and earlier.reviewer != identity.reviewer:
            # Decided before the console last queued it (its item had expired): out it goes.
            # (The reviewer's own decision shows the page: deciding the same again finishes
            # one whose webhooks could not be queued.)
            record = _decision_record(earlier)
            queue.mark_decided(verdict_id, record)
            return decided_page(request, record)
        holder = queue.lease(verdict_id, identity.reviewer)
        if holder is not None:
            return message(
                request, 423, "Being reviewed", f"{holder} has this item open; it is hidden from others."
            )
        return render(
            "item.html",
            request,
            item=item,
            verdict=item.verdict,
            categories=categories,
            location=locate(client, item.verdict),
            lease_s=console.lease_s,
        )

    @app.get(
        "/items/{verdict_id}/image",
        summary="The verdict's image, proxied from S3",
        responses={200: {"content": {"image/*": {}}}},
    )
    def item_image(request: Request, verdict_id: VerdictId) -> Response:
        identity_of(request)
        item = queue.item(verdict_id)
        location = locate(client, item.verdict) if item is not None else None
        if location is None:
            return PlainTextResponse("no image for this verdict", status_code=404, headers=IMAGE_HEADERS)
        try:
            image = open_image(s3_for_images(), location, console.image_max_bytes)
        except ImageError as exc:
            return PlainTextResponse(exc.reason, status_code=exc.status, headers=IMAGE_HEADERS)
        return StreamingResponse(
            image.chunks,
            media_type=image.content_type,
            headers={**IMAGE_HEADERS, "Content-Length": str(image.length)},
        )

    @app.post("/items/{verdict_id}/decide", response_class=HTMLResponse, summary="Decide a queued verdict")
    def decide(
        request: Request,
        verdict_id: VerdictId,
        decision: Annotated[Literal["safe", "unsafe"], Form()],
        csrf: Csrf = "",
        category: Annotated[str | None, Form(max_length=64)] = None,
    ) -> Response:
        identity = identity_of(request)
        if not auth.csrf_ok(identity, csrf):
            return forbidden(request)
        raw = queue.raw_item(verdict_id)
        if raw is not None and raw.get("decided"):
            return decided_page(request, raw)
        item = queue.item(verdict_id)
        if item is None:
            return message(request, 404, "Not in the queue", "This verdict is not waiting for review.")
        category = category or None
        if decision == "unsafe" and category not in categories:
            return message(request, 400, "Category needed", "An unsafe decision names one of the categories.")
        if decision == "safe":
            category = None
        holder = queue.lease(verdict_id, identity.reviewer)
        if holder is not None:
            return message(request, 423, "Being reviewed", f"{holder} has this item open.")
        result = review.decide(
            client,
            settings,
            item.verdict,
            identity.reviewer,
            decision,
            category,
            s3=s3_for_images(),
            send_task=sender(),
        )
        record = _decision_record(result.decision)
        queue.mark_decided(verdict_id, record)
        if not result.accepted:
            return decided_page(request, record)
        return RedirectResponse("/next", status_code=303)

    @app.post("/items/{verdict_id}/skip", response_class=HTMLResponse, summary="Skip an item for now")
    def skip(request: Request, verdict_id: VerdictId, csrf: Csrf = "") -> Response:
        identity = identity_of(request)
        if not auth.csrf_ok(identity, csrf):
            return forbidden(request)
        queue.skip(verdict_id, identity.reviewer)
        return RedirectResponse("/next", status_code=303)

    @app.get(
        "/export.csv",
        summary="Review decisions as a labels file (uri,label,category)",
        responses={200: {"content": {"text/csv": {}}}},
    )
    def export(
        request: Request,
        since: Annotated[datetime | None, Query()] = None,
        until: Annotated[datetime | None, Query()] = None,
    ) -> Response:
        identity_of(request)
        lines = review.export_labels(client, since=_unix(since), until=_unix(until))
        return StreamingResponse(
            lines,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="review-labels.csv"'},
        )

    @app.get("/dashboard", response_class=HTMLResponse, summary="Verdict counts, queue depth, backlog")
    def dashboard(
        request: Request, hours: Annotated[int, Query(ge=1, le=dashboard_mod.MAX_HOURS)] = 24
    ) -> Response:
        identity_of(request)
        board = dashboard_mod.build(client, hours)
        return render("dashboard.html", request, board=board, colours=dashboard_mod.COLOURS)

    banks_api.install(app, settings, client)
    return app


def _unix(value: datetime | None) -> float | None:
    """A query time as unix seconds (a time without a zone is UTC)."""
    if value is None:
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
