"""Take-down feedback: the hashes of verdicts into a bank, so that re-uploads of an image a
platform removed match (``modgate banks add-from-verdict`` and the console's bank API).

A verdict carries its hashes (``hashes.pdq``/``pdq_file``/``md5``, ``source.sha256``); this
module finds a verdict still on the results stream, or reads verdicts from a JSONL file, and
turns the hashes of a bank's kind into bank entries noted with the verdict id. A PDQ bank
gets both PDQs of an EXIF-rotated image: the displayed frame's (``pdq``) and the file's
(``pdq_file``, what ThreatExchange computes), so re-uploads with or without the EXIF tag
match. Light (no numpy): the console uses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modgate import keys
from modgate.bank_store import BankStore, _text
from modgate.banks import BankEntry, BankFormatError, check_quality, normalize_hash

VERDICT_ID_PATTERN = r"^[0-9a-f]{32}$"

# KEYS: stream. ARGV: start ('+' or an exclusive '(id'), page size, verdict id.
# Returns {'found', verdict json}, {'more', last id read} or {'done'}: a server-side scan, so
# only the verdict asked for crosses the wire.
_FIND_VERDICT = """
local page = redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', ARGV[2])
for _, entry in ipairs(page) do
  local f = entry[2]
  local id, body = nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'id' then id = f[i + 1] elseif f[i] == 'verdict' then body = f[i + 1] end
  end
  if id == ARGV[3] and body then return {'found', body} end
end
if #page < tonumber(ARGV[2]) then return {'done'} end
return {'more', page[#page][1]}
"""


def find_verdict(redis: Any, stream: str, verdict_id: str, page: int = 5000) -> dict[str, Any] | None:
    """A verdict still on the results stream, by id: through its published marker (which
    holds its entry id) when that has not expired, else by a paged scan in Redis. None when
    it is not there, or what is there is not a JSON object."""
    entry = redis.get(keys.published_marker(verdict_id))
    if entry is not None and _text(entry) not in ("", "1"):
        for _id, fields in redis.xrange(stream, _text(entry), _text(entry)):
            body = {_text(k): v for k, v in fields.items()}.get("verdict")
            if body is not None:
                return _json_object(body)
    script = redis.register_script(_FIND_VERDICT)
    start = "+"
    while True:
        reply = script(keys=[stream], args=[start, page, verdict_id])
        status = _text(reply[0])
        if status == "found":
            return _json_object(reply[1])
        if status == "done":
            return None
        start = "(" + _text(reply[1])


def _json_object(body: Any) -> dict[str, Any] | None:
    # The stream is written by workers, but it is still a process boundary.
    try:
        value = json.loads(_text(body))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def verdict_hashes(verdict: Mapping[str, Any], kind: str) -> tuple[list[BankEntry], str]:
    """The hashes of ``kind`` a verdict carries, as bank entries noted with the verdict id
    (PDQ: the displayed frame's and, for an EXIF-rotated file, the file's); ([], why not)
    when it has none that a bank may take."""
    vid = str(verdict.get("id") or "?")
    hashes = verdict.get("hashes") or {}
    source = verdict.get("source") or {}
    if not isinstance(hashes, Mapping) or not isinstance(source, Mapping):
        return [], f"verdict {vid}: not a verdict (hashes/source are not objects)"
    if kind == "sha256":
        candidates = [(source.get("sha256"), None)]
    elif kind == "md5":
        candidates = [(hashes.get("md5"), None)]
    else:
        candidates = [
            (hashes.get("pdq"), hashes.get("pdq_quality")),
            (hashes.get("pdq_file"), hashes.get("pdq_file_quality")),
        ]
    entries: list[BankEntry] = []
    problems: list[str] = []
    for value, quality in candidates:
        if not value:
            continue
        try:
            if isinstance(quality, int):
                check_quality(kind, quality)
            entry = BankEntry(normalize_hash(kind, str(value)), f"verdict {vid}", quality)
        except BankFormatError as exc:
            problems.append(str(exc))
            continue
        if entry not in entries:
            entries.append(entry)
    if entries:
        return entries, ""
    if problems:
        return [], f"verdict {vid}: {problems[0]}"
    why = "an error verdict" if verdict.get("status") == "error" else "no hashes (an older verdict?)"
    return [], f"verdict {vid}: no {kind} hash ({why})"


def read_verdict_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Verdicts of a JSONL file (``modgate scan --output``, or the stream exported);
    BankFormatError names the line of one that is not JSON."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise BankFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                verdict = json.loads(line)
            except ValueError:
                raise BankFormatError(f"{path}:{number}: not a JSON verdict") from None
            if not isinstance(verdict, dict):
                raise BankFormatError(f"{path}:{number}: not a JSON verdict")
            yield verdict


@dataclass
class Takedown:
    """What adding verdicts' hashes to a bank did."""

    verdicts: int = 0
    added: int = 0
    already: int = 0
    version: int | None = None
    # One line per verdict that gave nothing: not found, or no hash a bank may take.
    skipped: list[str] = field(default_factory=list)


def add_verdicts(store: BankStore, bank: str, verdicts: Iterable[Mapping[str, Any]]) -> Takedown:
    """Add the hashes of the bank's kind of each verdict to ``bank`` (BankStoreError when
    there is no such bank or it does not validate)."""
    spec = store.spec(bank)
    result = Takedown()
    entries: list[BankEntry] = []
    for verdict in verdicts:
        result.verdicts += 1
        found, why = verdict_hashes(verdict, spec.kind)
        if found:
            entries += found
        else:
            result.skipped.append(why)
    if entries:
        result.added, version = store.add(bank, entries)
        result.version = version or None
    result.already = len(entries) - result.added
    return result
