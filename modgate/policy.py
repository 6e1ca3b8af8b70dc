"""The moderation policy: which categories count, their thresholds, and the declarative
mapping from detector scores to the 11 UnsafeBench categories.

The default policy ships as ``policy_default.yaml`` next to this module; a deployment
overrides any part of it through its settings (YAML file or ``MODGATE_POLICY__...``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modgate.detector_scores import CATEGORIES, DECLARED_SCORES, Category
from modgate.errors import ConfigError, ErrorCode, PolicyError

if TYPE_CHECKING:
    from modgate.verdict import Verdict

DEFAULT_POLICY_FILE = Path(__file__).with_name("policy_default.yaml")


class Evidence(BaseModel):
    """One detector score that counts towards a category: ``weight * scores[score]``."""

    model_config = ConfigDict(extra="forbid")

    detector: str
    score: str
    weight: float = Field(1.0, gt=0.0)

    @property
    def key(self) -> str:
        """``detector.score``: how drivers and logistic weights name this evidence."""
        return f"{self.detector}.{self.score}"


class CategoryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counted: bool = True
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    # Lower edge of the review band: scores in [review, threshold) ask for a human.
    review: float | None = Field(0.5, ge=0.0, le=1.0)
    evidence: list[Evidence] = Field(default_factory=list)
    # How evidence becomes the category score: ``max`` = weighted max (each evidence's
    # ``weight``); ``logistic`` = sigmoid(bias + sum of weights[detector.score] * score),
    # fitted by ``modgate calibrate``.
    fusion: Literal["max", "logistic"] = "max"
    weights: dict[str, float] | None = None
    bias: float | None = None
    # A logistic score without one of its inputs is meaningless: by default the worker
    # refuses to start when a weighted detector is not loaded; ``review`` sends every
    # image to review for this category instead.
    on_missing: Literal["fail", "review"] = "fail"

    @model_validator(mode="after")
    def _review_below_threshold(self) -> CategoryPolicy:
        if self.review is not None and self.review > self.threshold:
            raise ValueError(f"review band start {self.review} is above the threshold {self.threshold}")
        return self

    @model_validator(mode="after")
    def _logistic_complete(self) -> CategoryPolicy:
        if self.fusion != "logistic":
            return self
        if not self.weights or self.bias is None:
            raise ValueError("fusion: logistic needs `weights` (evidence -> weight) and `bias`")
        listed = {e.key for e in self.evidence}
        unknown = sorted(set(self.weights) - listed)
        if unknown:
            raise ValueError(
                f"logistic weights name evidence the category does not list: {', '.join(unknown)} "
                f"(listed: {', '.join(sorted(listed)) or 'none'})"
            )
        return self

    def weighted_detectors(self) -> set[str]:
        """Detectors a logistic score cannot be computed without."""
        if self.fusion != "logistic" or not self.weights:
            return set()
        return {key.partition(".")[0] for key in self.weights}


class QuarantineAction(BaseModel):
    """Move objects out of the way: copy to ``bucket``/``prefix`` + key, verify, delete."""

    model_config = ConfigDict(extra="forbid")

    bucket: str | None = None  # None = the object's own bucket
    prefix: str = "quarantine/"
    decisions: list[Literal["unsafe", "review"]] = Field(default_factory=lambda: ["unsafe"])


class PolicyActions(BaseModel):
    """Optional changes the worker makes to the moderated S3 object after publishing."""

    model_config = ConfigDict(extra="forbid")

    # Tag every moderated object with its decision (merged into its existing tags).
    tag: bool = False
    tag_key: str = "modgate-decision"
    quarantine: QuarantineAction | None = None


ErrorAction = Literal["none", "tag", "quarantine"]
ERROR_KEYS: tuple[str, ...] = ("all", *(c.value for c in ErrorCode))


class ErrorRule(BaseModel):
    """What an error verdict does to its object, and whether it counts as review. Unset
    fields fall back to the ``all`` rule, then to ``action: tag``, ``review: false``."""

    model_config = ConfigDict(extra="forbid")

    # none: leave the object; tag: tag it ``<tag_key>: error``; quarantine: tag and move it
    # to ``actions.quarantine``'s location (its defaults when unset).
    action: ErrorAction | None = None
    # True: the error verdict's ``decision`` is ``review``, so review queues pick it up.
    review: bool | None = None


@dataclass(frozen=True)
class ResolvedErrorRule:
    action: ErrorAction
    review: bool


BankAction = Literal["unsafe", "review", "safe"]


class BankOverride(BaseModel):
    """This policy's view of one bank: its action turned down or up, another category."""

    model_config = ConfigDict(extra="forbid")

    action: BankAction | None = None
    category: Category | None = None


class BankPolicy(BaseModel):
    """Which hash banks count under this policy and what their matches do. A bank's match
    applies before, and above, detector evidence (unsafe > review > safe when several
    match); banks change without a policy version, so matches are never cached."""

    model_config = ConfigDict(extra="forbid")

    # "all": every bank the worker knows (in Redis, or given to `modgate scan --bank`).
    use: Literal["all"] | list[str] = "all"
    overrides: dict[str, BankOverride] = Field(default_factory=dict)
    # A decisive match may skip the models: by default an unsafe match does (the detectors
    # cannot make it safer), an allow-list match does not (their scores stay on record).
    skip_models_on_match: dict[BankAction, bool] = Field(
        default_factory=lambda: {"unsafe": True, "review": False, "safe": False}
    )

    def uses(self, bank: str) -> bool:
        return self.use == "all" or bank in self.use

    def resolve(self, bank: str, action: str, category: str | None) -> tuple[str, str | None]:
        """The action and category of a match in ``bank`` under this policy."""
        override = self.overrides.get(bank) or BankOverride()
        return override.action or action, override.category or category

    def skips_models(self, action: str) -> bool:
        return bool(self.skip_models_on_match.get(action, False))  # type: ignore[call-overload]


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    categories: dict[Category, CategoryPolicy]
    actions: PolicyActions = Field(default_factory=PolicyActions)
    # Error verdicts by code (or ``all``): an error must never leave an object looking
    # moderated, so by default its object is tagged.
    errors: dict[str, ErrorRule] = Field(default_factory=dict)
    # Hash banks (additive): which count, and what a match does.
    banks: BankPolicy = Field(default_factory=BankPolicy)

    @field_validator("errors")
    @classmethod
    def _known_error_codes(cls, value: dict[str, ErrorRule]) -> dict[str, ErrorRule]:
        unknown = sorted(set(value) - set(ERROR_KEYS))
        if unknown:
            raise ValueError(f"unknown error code(s) {', '.join(unknown)} (known: {', '.join(ERROR_KEYS)})")
        return value

    def error_rule(self, code: ErrorCode | str) -> ResolvedErrorRule:
        """The rule for an error verdict with ``code``: its own entry, else ``all``, else tag."""
        own = self.errors.get(str(code)) or ErrorRule()
        every = self.errors.get("all") or ErrorRule()
        action = own.action or every.action or "tag"
        review = own.review if own.review is not None else bool(every.review)
        return ResolvedErrorRule(action, review)

    def error_decision(self, code: ErrorCode | str) -> Literal["review"] | None:
        """The ``decision`` of an error verdict with ``code``: ``review`` or None."""
        return "review" if self.error_rule(code).review else None

    @model_validator(mode="after")
    def _all_categories(self) -> Policy:
        missing = [c for c in CATEGORIES if c not in self.categories]
        if missing:
            raise ValueError(f"policy lacks categories: {', '.join(missing)}")
        return self

    def detectors_used(self) -> set[str]:
        return {e.detector for c in self.categories.values() for e in c.evidence}

    def missing_detectors(self, loaded: Collection[str]) -> dict[str, list[str]]:
        """Logistic categories (``on_missing: fail``) whose weighted detectors are not all
        in ``loaded``: category -> the missing detector ids. Empty = this policy can run."""
        missing: dict[str, list[str]] = {}
        for name, rule in self.categories.items():
            if rule.on_missing == "fail":
                lacking = sorted(rule.weighted_detectors() - set(loaded))
                if lacking:
                    missing[name] = lacking
        return missing


def with_error_decision(verdict: Verdict, policy: Policy) -> Verdict:
    """An error verdict with the ``decision`` its code gets under ``policy`` (``review``
    where the rule says ``review: true``, else None); ok verdicts unchanged. The worker,
    ``scan`` and ``replay`` all call this, so they agree."""
    if verdict.error is None:
        return verdict
    decision = policy.error_decision(verdict.error.code)
    return verdict if verdict.decision == decision else verdict.model_copy(update={"decision": decision})


def require_detectors(
    policies: Mapping[str, Policy], loaded: Collection[str], skipped: Mapping[str, str]
) -> None:
    """Start-up check for the worker and ``scan``: a logistic category must not fail open,
    so a detector it has weights for that did not load (``skipped`` says why) stops the
    process, unless the category says ``on_missing: review``. ``policies``: name -> policy."""
    problems = []
    for name, policy in policies.items():
        for category, lacking in policy.missing_detectors(loaded).items():
            why = ", ".join(f"{d} ({skipped[d]})" if d in skipped else f"{d} (not enabled)" for d in lacking)
            problems.append(f"{name} {policy.version}: category {category} (fusion: logistic) needs {why}")
    if problems:
        raise ConfigError(
            "; ".join(problems) + ". Load those detectors, or set `on_missing: review` on the category."
        )


# -- loading: YAML with line numbers, evidence checked against the declared scores ---------


Location = tuple[str | int, ...]


def evidence_problems(policy: Policy) -> list[tuple[Location, str]]:
    """Evidence naming a detector or score that no registered detector declares: a typo
    there would silently drop that evidence (fail open). (location, message) pairs."""
    problems: list[tuple[Location, str]] = []
    for name, rule in policy.categories.items():
        for i, e in enumerate(rule.evidence):
            where: Location = ("categories", name, "evidence", i)
            if e.detector not in DECLARED_SCORES:
                known = ", ".join(sorted(DECLARED_SCORES))
                problems.append(((*where, "detector"), f"unknown detector {e.detector!r} (known: {known})"))
            elif e.score not in DECLARED_SCORES[e.detector]:
                known = ", ".join(sorted(DECLARED_SCORES[e.detector]))
                message = f"unknown score {e.score!r} of detector {e.detector} (known: {known})"
                problems.append(((*where, "score"), message))
    return problems


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """A YAML file's data and its node tree (for line numbers). A syntax error is a
    ``PolicyError`` naming the file and line, not a traceback."""
    try:
        loader = yaml.SafeLoader(path.read_text())
        try:  # one parse: the data is constructed from the node tree (as yaml.safe_load does)
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{path}{line}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read: {exc}") from None
    return data, node


def node_line(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the node at ``loc`` (mapping keys, sequence indexes): the line of its
    key in a mapping. None when the tree does not hold that location."""
    line: int | None = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(
                ((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                None,
            )
            if pair is None:
                return None
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None
    return line


@dataclass(frozen=True)
class PolicySource:
    """Where part of a policy came from: ``label`` (a file name) and its node tree, with
    ``prefix`` the path of the policy inside that tree (e.g. ``("policy",)``)."""

    label: str
    node: yaml.Node | None
    prefix: Location = ()

    def line(self, loc: Location) -> int | None:
        return node_line(self.node, (*self.prefix, *loc)) if loc else None


def _dotted(loc: Location) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(loc: Location, message: str, sources: Sequence[PolicySource], name: str) -> str:
    for source in sources:
        line = source.line(loc)
        if line is not None:
            return f"{source.label}:{line}: {message} (at {_dotted(loc)})"
    return f"{name}: {message} (at {_dotted(loc)})"


def load_policy(
    data: Mapping[str, Any], sources: Sequence[PolicySource] = (), name: str = "policy"
) -> Policy:
    """Validate merged policy data as loaded from files or the environment: the model's own
    checks plus evidence against the detectors' declared scores. Any problem is a
    ``PolicyError`` naming the file and line (the first of ``sources`` holding that
    location), else ``name`` (the environment, a built-in default)."""
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if p != "[key]")
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown field {loc[-1]!r}"
            lines.append(_describe(loc, message, sources, name))
        raise PolicyError("invalid policy: " + "; ".join(lines)) from None
    problems = evidence_problems(policy)
    if problems:
        raise PolicyError(
            "invalid policy: " + "; ".join(_describe(loc, m, sources, name) for loc, m in problems)
        )
    return policy


@cache
def _default_policy_dict() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_POLICY_FILE.read_text())


def default_policy_dict() -> dict[str, Any]:
    """A fresh deep copy of the built-in policy as plain data, ready to be merged into."""
    return deep_merge({}, _default_policy_dict())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; dicts merge key by key, anything else replaces."""
    out: dict[str, Any] = {}
    for key in base.keys() | override.keys():
        if (
            key in override
            and key in base
            and isinstance(base[key], dict)
            and isinstance(override[key], dict)
        ):
            out[key] = deep_merge(base[key], override[key])
        elif key in override:
            out[key] = override[key]
        else:
            out[key] = base[key] if not isinstance(base[key], dict) else deep_merge(base[key], {})
    return out
