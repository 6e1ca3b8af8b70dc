"""report.html as a browser gets it: one self-contained file whose tables carry the same
numbers as report.json (parsed with the standard library's HTML parser), and the charts."""

from html.parser import HTMLParser

import numpy as np
import pytest

from modgate.policy import CATEGORIES, Policy, default_policy_dict
from worker.quality.labels import LabelRow, LabelSet, join
from worker.quality.metrics import evaluate
from worker.quality.report import category_figure, write_report
from worker.quality.synthetic import CALIBRATION_SCORES, generate


class Page(HTMLParser):
    """Tables by id (rows of cell texts), list items of ``ul#notes``, and every URL-bearing
    attribute, so a test can tell whether the page needs anything but itself."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.notes: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_notes = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        for name in ("src", "href", "action", "data"):
            if name in attrs:
                self.urls.append((tag, name, attrs[name]))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"#{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "ul" and attrs.get("id") == "notes":
            self._in_notes = True
        elif tag == "li" and self._in_notes:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "li" and self._in_notes and self._cell is not None:
            self.notes.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "ul":
            self._in_notes = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def column(table: list[list[str]], header: str, row: str) -> str:
    headers = table[0]
    return next(r for r in table[1:] if r[0] == row)[headers.index(header)]


def matrix(table: list[list[str]]) -> dict[str, int]:
    (_, tp, fn), (_, fp, tn) = table[1], table[2]
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Sexual (covered, with a review band) and spam (labelled, no detector) over two splits."""
    verdicts, rows = generate(500, seed=6, scores=CALIBRATION_SCORES, categories=["sexual", "spam"])
    labels = [
        LabelRow(r["uri"], f"/synthetic/{r['uri']}", r["label"] == "unsafe",
                 {c: int(c == r["category"]) for c in CATEGORIES}, r["split"], i + 2)
        for i, r in enumerate(rows)
    ]  # fmt: skip
    evaluation = evaluate(join(LabelSet(labels, "unsafebench"), verdicts), _policy(), resamples=100)
    report = evaluation.report
    report["errors"], report["unmatched"] = {}, {"safe_with_category": {"count": 2, "examples": ["x.jpg"]}}
    out = tmp_path_factory.mktemp("report")
    write_report(out, evaluation)
    return evaluation, report, Page((out / "report.html").read_text())


def _policy() -> Policy:
    return Policy.model_validate(default_policy_dict())


def test_confusion_matrices_per_category_and_per_split_equal_report_json(written):
    _, report, page = written
    sexual = report["categories"]["sexual"]
    assert matrix(page.tables["confusion-sexual"]) == sexual["at_threshold"]["confusion"]
    assert matrix(page.tables["confusion-review-sexual"]) == sexual["at_review"]["confusion"]
    assert set(report["splits"]) == {"ai", "real"}
    for split, block in report["splits"].items():
        assert matrix(page.tables[f"split-confusion-{split}"]) == block["confusion"]
        assert sum(block["confusion"].values()) == block["positives"] + block["negatives"]


def test_category_table_shows_review_start_fpr_with_review_and_open_precision_intervals(written):
    _, report, page = written
    table, sexual = page.tables["categories"], report["categories"]["sexual"]
    assert column(table, "review from", "sexual") == "0.500"
    assert column(table, "FPR with review", "sexual") == f"{sexual['at_review']['fpr']:.3f}"
    assert column(table, "recall with review", "sexual") == f"{sexual['at_review']['recall']:.3f}"
    low, high = sexual["ci95"]["precision"]
    assert column(table, "precision 95 %", "sexual") == f"[{low:.3f}, {high:.3f}]"
    assert column(table, "uncovered pos", "spam") == str(report["categories"]["spam"]["uncovered_positives"])


def test_fused_and_detectors_compared_on_best_f1_with_their_image_counts(written):
    _, report, page = written
    table, sexual = page.tables["detectors-sexual"], report["categories"]["sexual"]
    assert table[0] == ["detector", "score", "images", "AUROC", "AP", "best F1", "F1 at threshold"]
    assert column(table, "best F1", "fused") == f"{sexual['best_f1']:.3f}"
    assert column(table, "F1 at threshold", "fused") == f"{sexual['at_threshold']['f1']:.3f}"
    nsfw = sexual["detectors"]["open_nsfw"]["nsfw"]
    assert column(table, "best F1", "open_nsfw") == f"{nsfw['best_f1']:.3f}"
    assert column(table, "images", "open_nsfw") == str(nsfw["n"]) == column(table, "images", "fused")


def test_notes_and_input_issues_are_on_the_page(written):
    _, report, page = written
    spam = report["categories"]["spam"]["uncovered_positives"]
    assert page.notes == [f"{spam} labelled images in spam, no enabled detector covers it"]
    issue = column(
        page.tables["input"], "count", "labelled safe with a category (contradictory: counted safe)"
    )
    assert issue == "2"


def test_the_page_is_one_self_contained_file(written):
    _, _, page = written
    assert page.urls and all(url.startswith("data:image/png;base64,") for _, _, url in page.urls)
    assert {("img", "src")} == {(tag, name) for tag, name, _ in page.urls}
    assert not page.tags & {"script", "link", "iframe", "object"}


def test_both_curve_charts_have_a_legend_naming_every_score(written):
    evaluation, _, _ = written
    arrays = evaluation.categories["sexual"]
    figure = category_figure("sexual", arrays)
    pr, roc, _ = figure.axes
    expected = ["fused", *arrays.evidence]
    assert len(expected) == 4  # fused, open_nsfw, nudenet, falconsai_vit
    for axes in (pr, roc):
        legend = axes.get_legend()
        assert legend is not None and [t.get_text() for t in legend.get_texts()] == expected
    assert np.isfinite(arrays.fused).all()
