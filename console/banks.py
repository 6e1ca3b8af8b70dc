"""The console's JSON API over the hash banks in Redis: list them, create or change one, add
and remove hashes, and take-down feedback (the hashes of verdicts into a bank). Workers
apply every change within seconds (worker/judge/banks.py follows the banks' changes
stream); what matching does with a bank is theirs, so there is no lookup here.

Every request is checked before Redis is touched: a hash that is not one of the bank's kind
(wrong length, not hex, a PDQ of quality below 50) is a 400 naming its position, never a
500. Errors are JSON ``{"code", "detail"}``. Writes need a JSON body (``Content-Type:
application/json``): a browser cannot send one cross-site without a CORS preflight, which
this app never grants, so a reviewer's session cookie cannot be ridden by another site.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from console.auth import identity_of
from modgate import takedown
from modgate.bank_store import BankState, BankStore, BankStoreError
from modgate.banks import (
    NAME_PATTERN,
    PDQ_MAX_DISTANCE,
    BankAction,
    BankEntry,
    BankFormatError,
    BankKind,
    BankSpec,
    entries_from_hashes,
    normalize_hash,
)
from modgate.detector_scores import Category
from modgate.settings import Settings

# A request body is at most 16 KiB (console/auth.py): about 230 PDQ hashes. Lists are for
# `modgate banks import`.
MAX_HASHES = 1000
MAX_VERDICTS = 100

BankName = Annotated[str, Path(pattern=NAME_PATTERN)]
Hashes = Annotated[list[Annotated[str, Field(max_length=200)]], Field(min_length=1, max_length=MAX_HASHES)]


class BankOut(BaseModel):
    name: str
    kind: str | None = None
    category: str | None = None
    action: str | None = None
    max_distance: int | None = None
    allow_pdq: bool | None = None
    hashes: int = Field(description="hashes stored")
    version: int | None = None
    valid: bool = Field(description="false: workers refuse this bank and keep their last good copy")
    problem: str | None = None


class BankIn(BaseModel):
    """A bank's spec without its name (the path names it)."""

    model_config = ConfigDict(extra="forbid")

    kind: BankKind
    category: Category = "illegal_activity"
    action: BankAction = "unsafe"
    max_distance: int | None = Field(None, ge=0, le=PDQ_MAX_DISTANCE)
    allow_pdq: bool = False


class HashesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hashes: Hashes
    note: str = Field("", max_length=1000)
    # PDQ only: the quality of the hashes, when known (below 50 they are refused).
    quality: int | None = Field(None, ge=0, le=100)


class RemoveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hashes: Hashes


class VerdictsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict_ids: list[Annotated[str, Field(pattern=takedown.VERDICT_ID_PATTERN)]] = Field(
        min_length=1, max_length=MAX_VERDICTS
    )


class Changed(BaseModel):
    bank: str
    added: int = 0
    removed: int = 0
    already: int = Field(
        0, description="given hashes the bank held already (added) or did not hold (removed)"
    )
    version: int | None = None
    hashes: int | None = Field(None, description="hashes in the bank now")


class TakedownOut(Changed):
    verdicts: int
    skipped: list[str] = Field(description="verdicts that gave no hash, and why")


class Problem(BaseModel):
    code: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Problem} for status in (400, 404, 409, 415, 503)}


class ApiProblem(Exception):
    """An answer other than 2xx, raised from anywhere in a route."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def problem(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"code": code, "detail": detail}, status_code=status)


def _out(state: BankState) -> BankOut:
    spec = state.spec
    return BankOut(
        name=state.name,
        kind=spec.kind if spec else None,
        category=spec.category if spec else None,
        action=spec.action if spec else None,
        max_distance=spec.max_distance if spec else None,
        allow_pdq=spec.allow_pdq if spec else None,
        hashes=state.stored,
        version=state.version,
        valid=state.problem is None,
        problem=state.problem,
    )


def _store_problem(exc: BankStoreError) -> ApiProblem:
    if "no bank named" in str(exc):
        return ApiProblem(404, "no_such_bank", str(exc))
    return ApiProblem(409, "bank_refused", str(exc))


def install(app: FastAPI, settings: Settings, client: Any) -> None:
    """Add the /api/banks routes to the console, and the handlers that turn their refusals
    (and a BankStoreError from the store) into JSON problems."""
    app.include_router(bank_router(settings, client))

    async def refused(_: Request, exc: Exception) -> JSONResponse:
        found = exc if isinstance(exc, ApiProblem) else _store_problem(exc)  # type: ignore[arg-type]
        return problem(found.status, found.code, found.detail)

    app.add_exception_handler(ApiProblem, refused)
    app.add_exception_handler(BankStoreError, refused)


def bank_router(settings: Settings, client: Any) -> APIRouter:
    """The /api/banks routes, on the console's Redis client."""
    store = BankStore(client, settings.banks)
    router = APIRouter(prefix="/api/banks", tags=["banks"], responses=ERRORS)

    def writable(request: Request, name: str) -> BankSpec:
        """The spec of the bank a write names, after the checks every write makes."""
        _json_only(request)
        return store.spec(name)

    def changed(name: str, version: int, **counts: int) -> Changed:
        state = store.state(name)
        return Changed(
            bank=name, version=version or None, hashes=state.stored if state is not None else None, **counts
        )

    @router.get("", response_model=list[BankOut], summary="Every bank: kind, action, size, validity")
    def list_banks(request: Request) -> Any:
        identity_of(request)
        return [_out(state) for _, state in sorted(store.states().items())]

    @router.get("/{name}", response_model=BankOut, summary="One bank")
    def get_bank(request: Request, name: BankName) -> Any:
        identity_of(request)
        state = store.state(name)
        if state is None:
            raise ApiProblem(404, "no_such_bank", f"no bank named {name!r}")
        return _out(state)

    @router.put("/{name}", response_model=BankOut, summary="Create a bank, or change what a match in it does")
    def put_bank(request: Request, name: BankName, body: Annotated[BankIn, Body()]) -> Any:
        _json_only(request)
        try:
            spec = BankSpec(name=name, **body.model_dump())
        except ValueError as exc:  # max_distance on an exact kind
            raise ApiProblem(400, "bad_bank", str(exc).splitlines()[-1].strip()) from None
        try:
            store.put_spec(spec)
        except BankStoreError as exc:  # a kind change is a conflict, not a missing bank
            raise ApiProblem(409, "bank_refused", str(exc)) from None
        state = store.state(name)
        if state is None:
            raise ApiProblem(409, "bank_refused", "the bank was dropped meanwhile")
        return _out(state)

    @router.post("/{name}/hashes", response_model=Changed, summary="Add hashes to a bank")
    def add_hashes(request: Request, name: BankName, body: Annotated[HashesIn, Body()]) -> Any:
        spec = writable(request, name)
        note = body.note or f"added by {identity_of(request).reviewer} (console API)"
        entries = _entries(spec.kind, body.hashes, note, body.quality)
        added, version = store.add(name, entries)
        return changed(name, version, added=added, already=len({e.hash for e in entries}) - added)

    @router.post("/{name}/remove", response_model=Changed, summary="Remove hashes from a bank")
    def remove_hashes(request: Request, name: BankName, body: Annotated[RemoveIn, Body()]) -> Any:
        spec = writable(request, name)
        wanted = sorted({e.hash for e in _entries(spec.kind, body.hashes)})
        removed, version = store.remove(name, wanted)
        return changed(name, version, removed=removed, already=len(wanted) - removed)

    @router.post(
        "/{name}/from-verdicts",
        response_model=TakedownOut,
        summary="Take-down feedback: add the hashes of verdicts still on the results stream",
    )
    def from_verdicts(request: Request, name: BankName, body: Annotated[VerdictsIn, Body()]) -> Any:
        writable(request, name)
        verdicts: list[dict[str, Any]] = []
        missing: list[str] = []
        for vid in dict.fromkeys(body.verdict_ids):
            found = takedown.find_verdict(client, settings.results.stream, vid)
            if found is None:
                missing.append(f"verdict {vid}: not on the results stream (trimmed, or never published)")
            else:
                verdicts.append(found)
        result = takedown.add_verdicts(store, name, verdicts)
        out = changed(name, result.version or 0, added=result.added, already=result.already)
        return TakedownOut(**out.model_dump(), verdicts=result.verdicts, skipped=missing + result.skipped)

    return router


def _json_only(request: Request) -> None:
    identity_of(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiProblem(415, "json_required", "send the body as Content-Type: application/json")


def _entries(kind: str, given: list[str], note: str = "", quality: int | None = None) -> list[BankEntry]:
    """The given hashes as entries of a bank of ``kind``; a 400 naming the first that is
    not one (or the quality or note that is wrong)."""
    try:
        return entries_from_hashes(kind, given, note, quality)
    except BankFormatError as exc:
        for i, text in enumerate(given):
            try:
                normalize_hash(kind, text)
            except BankFormatError as each:
                raise ApiProblem(400, "bad_hash", f"hashes[{i}]: {each}") from None
        raise ApiProblem(400, "bad_hash", str(exc)) from None
