"""The trajectory viewer: self-contained HTML (fast checks) and a real headless Chromium run (slow)."""
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from stepsearch.eval.metrics import score_prediction
from stepsearch.rewards import RewardConfig
from stepsearch.viz.report import render_html, write_report

GOLD = [{"id": "w1", "title": "Sugok", "text": "The mother of Sugok is Kiba."},
        {"id": "w2", "title": "Kiba", "text": "The rival of Kiba is Nathi."}]
DOC_WRONG = {"id": "w3", "title": "Kiba", "text": "The mentor of Kiba is Zel."}


def _raw(i, answer_text, rounds, question="Who is the rival of the mother of Sugok?"):
    traj = "".join(f"<search> {r['query']} </search>\n\n<information> ... </information>\n\n" for r in rounds)
    return {"id": f"q{i}", "data_source": "synthetic_world", "question": question, "trajectory": traj + answer_text,
            "targets": ["Nathi"], "search_keys": [], "support_docs": GOLD, "rounds": rounds, "num_turns": len(rounds) + 1,
            "num_searches": len(rounds), "num_tokens": 20, "finished": True}


def sample_predictions():
    r1 = {"query": "mother of Sugok", "docs": [GOLD[0], DOC_WRONG]}
    r2 = {"query": "rival of Kiba", "docs": [GOLD[1], DOC_WRONG]}
    raws = [_raw(0, "<answer> Nathi </answer>", [r1, r2]),
            _raw(1, "<answer> Zel </answer>", [r1, {"query": "mentor of Kiba", "docs": [DOC_WRONG]}]),
            _raw(2, "<answer> Nathi", [r1], question="Who is the rival of the mother of Qux </script><b>?")]
    return [score_prediction(r, RewardConfig(), f"raw[{i}]") for i, r in enumerate(raws)]


def test_html_is_self_contained_and_escapes_script_end():
    page = render_html(sample_predictions())
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)   # no network assets
    assert page.count("<script") == 2 and page.count("</script>") == 2     # the question's "</script>" is escaped
    assert '"em": 1.0' in page and "mother of Sugok" in page


def test_write_report_is_atomic_file(tmp_path):
    out = write_report(sample_predictions(), str(tmp_path / "r.html"))
    assert os.path.getsize(out) > 1000 and os.listdir(tmp_path) == ["r.html"]


BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
NO_BROWSER = ("headless browser test skipped: no Chromium found (looked for $CHROMIUM, then " + ", ".join(BROWSER_NAMES)
              + " on PATH). Install Debian's `chromium` package (`sudo apt-get install -y chromium`; .ci/run does it), "
              "or point CHROMIUM=/path/to/chrome at any Chromium/Chrome binary")


def _chromium():
    """The browser binary: $CHROMIUM, else the first of BROWSER_NAMES on PATH. Without one the test skips with
    NO_BROWSER, except under CI (CI=true, set by .ci/run), where a missing browser fails the run."""
    named = os.environ.get("CHROMIUM")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            pytest.fail(f"CHROMIUM={named!r} is not an executable file")
        return named
    for name in BROWSER_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI") == "true":
        pytest.fail(NO_BROWSER.replace("skipped", "cannot run under CI"))
    pytest.skip(NO_BROWSER)


def _run_chromium(args, timeout=90):
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=3000", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_viewer_renders_and_filters_in_headless_chromium(tmp_path):
    page = write_report(sample_predictions(), str(tmp_path / "report.html"))
    url = "file://" + page
    dom_all = _run_chromium(["--dump-dom", url]).stdout
    cards = re.findall(r'class="card (\w+)"', dom_all)
    assert sorted(cards) == ["correct", "format_fail", "wrong"]          # the JS rendered every question
    assert "3 of 3 shown" in dom_all and 'class="doc gold"' in dom_all     # gold hits highlighted
    assert re.search(r"G=<span class=\"num\">0\.\d{3}</span>", dom_all)   # per-round G^t rendered
    dom_wrong = _run_chromium(["--dump-dom", url + "#filter=wrong"]).stdout
    assert re.findall(r'class="card (\w+)"', dom_wrong) == ["wrong"] and "1 of 3 shown" in dom_wrong
    dom_search = _run_chromium(["--dump-dom", url + "#filter=all&q=Zel"]).stdout
    assert re.findall(r'data-id="(q\d)"', dom_search) == ["q1"]           # text search: only q1 mentions Zel
    shot = tmp_path / "report.png"
    _run_chromium([f"--screenshot={shot}", "--window-size=1200,900", url])
    assert shot.exists() and shot.stat().st_size > 5000
    print(f"screenshot: {shot}")


def _record_prediction():
    """A prediction whose trajectory record has a search round, an invalid turn, a failed retrieval and an answer."""
    from stepsearch.agent.record import ObservationRecord, PassageRecord, TrajectoryRecord, TurnRecord

    shown = tuple(PassageRecord(d["id"], d["title"], d["text"]) for d in (GOLD[0], DOC_WRONG))
    record = TrajectoryRecord(turns=(
        TurnRecord(0, 5, "search", "mother of Sugok", "mother of Sugok",
                   ObservationRecord("information", 5, 40, passages=shown)),
        TurnRecord(40, 44, "invalid", "", None, ObservationRecord("invalid_action", 44, 60)),
        TurnRecord(60, 66, "search", "rival of Kiba", "rival of Kiba",
                   ObservationRecord("retrieval_error", 66, 80, error="server said boom")),
        TurnRecord(80, 84, "answer", "Kiba")), response_length=84, finished=True, answer="Kiba", prediction="Kiba",
        answer_em=0.0, answer_f1=0.0)
    raw = _raw(3, "<answer> Kiba </answer>", record.rounds())
    return score_prediction({**raw, "record": record.to_dict(), "num_turns": 4}, RewardConfig(), "raw[3]")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_viewer_shows_the_record_turn_by_turn(tmp_path):
    page = write_report([_record_prediction()], str(tmp_path / "record.html"))
    dom = _run_chromium(["--dump-dom", "file://" + page]).stdout
    assert 'class="round"' in dom and "Round 1:" in dom and 'class="doc gold"' in dom   # the information turn
    assert "Turn 2: invalid action" in dom
    assert re.search(r'class="turn error">Turn 3: search <span class="query">rival of Kiba</span> failed: '
                     r'server said boom', dom)
    assert "Turn 4: answer <b>Kiba</b>" in dom
