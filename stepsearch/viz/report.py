"""Trajectory viewer: predictions JSONL (from `python -m stepsearch.eval`) -> one self-contained HTML file.

    python -m stepsearch.viz --predictions runs/eval/predictions.jsonl --out report.html

Per question it shows the question, then turn by turn what the trajectory record (stepsearch.agent.record) says
the policy did: each search round (query, the docs as shown with gold hits highlighted, G^t, P^t and the step
reward), invalid actions, failed retrievals and searches that were not run, then the answer against the targets,
EM/F1 and the full trajectory text. Predictions without a record show their rounds. Filters
(all / correct / wrong / format failure) and a text search work offline; the state also lives in the URL hash
(`#filter=wrong&q=Zorbak`), so a link reproduces a view. No network assets: CSS and JS are inline and the
data is embedded as JSON.
"""
from __future__ import annotations

import html
import json
from typing import Mapping, Sequence

from stepsearch.agent.record import TrajectoryRecord
from stepsearch.data.io import atomic_path

# Fields the page reads; anything else in a prediction is dropped to keep the file small.
_KEEP = ("id", "data_source", "question", "trajectory", "answer", "targets", "rounds", "em", "f1", "format_ok",
         "num_turns", "num_searches", "support_recall", "overall")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}
h1{font-size:1.3em} .bar{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ccc}
.bar button{margin-right:.3em;padding:.2em .7em} .bar button.on{background:#335;color:#fff}
#q{width:22em;padding:.2em} #count{margin-left:1em;color:#555}
.card{background:#fff;border:1px solid #ddd;border-left:6px solid #999;margin:.8em 0;padding:.6em .9em}
.card.correct{border-left-color:#2a8a3a} .card.wrong{border-left-color:#c0392b} .card.format_fail{border-left-color:#d68910}
.qtext{font-weight:600} .meta{color:#555;font-size:.9em} .round{margin:.4em 0 .4em 1em}
.query{font-family:monospace;background:#eef} .doc{font-size:.9em;margin-left:1.5em}
.doc.gold{background:#e3f6e3;border-left:3px solid #2a8a3a;padding-left:.3em}
.num{font-family:monospace} details pre{white-space:pre-wrap;font-size:.8em;background:#f4f4f4;padding:.5em}
.turn{margin:.3em 0 .3em 1em;color:#555} .turn.error{color:#c0392b}
"""

_JS = """
const DATA = JSON.parse(document.getElementById('data').textContent);
function outcome(p){ if(!p.format_ok) return 'format_fail'; return p.em >= 1 ? 'correct' : 'wrong'; }
function esc(s){ return String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c])); }
function num(x){ return (x === null || x === undefined) ? '–' : Number(x).toFixed(3); }
function renderRound(r, t){
  let h = `<div class="round">Round ${t+1}: <span class="query">${esc(r.query)}</span>
    <span class="meta">G=<span class="num">${num(r.info_gain)}</span> P=<span class="num">${num(r.redundancy)}</span>
    step=<span class="num">${num(r.step_reward)}</span></span>`;
  (r.docs || []).forEach((d, j) => {
    const gold = r.gold_hits && r.gold_hits[j];
    h += `<div class="doc${gold ? ' gold' : ''}">[${esc(d.id)}] <b>${esc(d.title)}</b> ${esc(d.text)}${gold ? ' ★gold' : ''}</div>`;
  });
  return h + '</div>';
}
function renderTurn(t, k, p, state){
  const head = `<div class="turn${t.obs === 'retrieval_error' ? ' error' : ''}">Turn ${k+1}:`;
  if(t.obs === 'information') {
    const r = p.rounds[state.round]; state.round += 1;
    return r ? renderRound(r, state.round - 1) : '';
  }
  if(t.obs === 'retrieval_error')
    return `${head} search <span class="query">${esc(t.query)}</span> failed: ${esc(t.error)}</div>`;
  if(t.action === 'invalid') return `${head} invalid action (warning shown)</div>`;
  if(t.action === 'search')
    return `${head} search <span class="query">${esc(t.text)}</span> not run (forced final turn or no budget)</div>`;
  if(t.action === 'answer') return `${head} answer <b>${esc(t.text)}</b></div>`;
  return '';
}
function renderSteps(p){
  if(!p.turns) return (p.rounds || []).map(renderRound).join('');
  const state = {round: 0};
  return p.turns.map((t, k) => renderTurn(t, k, p, state)).join('');
}
function renderCard(p){
  const o = outcome(p);
  return `<div class="card ${o}" data-outcome="${o}" data-id="${esc(p.id)}">
    <div class="qtext">${esc(p.question)}</div>
    <div class="meta">${esc(p.id)} · ${esc(p.data_source)} · ${o} · EM ${num(p.em)} · F1 ${num(p.f1)} ·
      searches ${p.num_searches} · turns ${p.num_turns} · support recall ${num(p.support_recall)}</div>
    ${renderSteps(p)}
    <div>Answer: <b class="answer">${esc(p.answer)}</b> · targets: ${p.targets.map(esc).join(' | ')}</div>
    <details><summary>trajectory</summary><pre>${esc(p.trajectory)}</pre></details></div>`;
}
function readHash(){
  const h = new URLSearchParams(location.hash.slice(1));
  return {filter: h.get('filter') || 'all', q: h.get('q') || ''};
}
function render(){
  const st = readHash();
  document.getElementById('q').value = st.q;
  document.querySelectorAll('.bar button').forEach(b => b.classList.toggle('on', b.dataset.filter === st.filter));
  const q = st.q.toLowerCase();
  const shown = DATA.filter(p => (st.filter === 'all' || outcome(p) === st.filter) &&
    (!q || JSON.stringify([p.question, p.answer, p.trajectory, p.id]).toLowerCase().includes(q)));
  document.getElementById('list').innerHTML = shown.map(renderCard).join('');
  document.getElementById('count').textContent = `${shown.length} of ${DATA.length} shown`;
}
function setState(filter, q){
  const h = new URLSearchParams(); h.set('filter', filter); if(q) h.set('q', q);
  location.hash = h.toString();
}
document.querySelectorAll('.bar button').forEach(b => b.addEventListener('click', () => setState(b.dataset.filter, readHash().q)));
document.getElementById('q').addEventListener('input', e => setState(readHash().filter, e.target.value));
window.addEventListener('hashchange', render);
render();
"""


def _compact(pred: Mapping) -> dict:
    out = {k: pred.get(k) for k in _KEEP}
    out["targets"] = [str(t) for t in (pred.get("targets") or [])]
    out["answer"] = "" if pred.get("answer") is None else str(pred.get("answer"))
    out["rounds"] = [{k: r.get(k) for k in ("query", "docs", "gold_hits", "info_gain", "redundancy", "step_reward")}
                     for r in (pred.get("rounds") or [])]
    if pred.get("record"):
        out["turns"] = _turns(pred["record"])
    return out


def _turns(record: Mapping) -> list[dict]:
    """The record's turns as the page needs them (passages are shown through the scored rounds)."""
    out = []
    for t in TrajectoryRecord.from_dict(record).turns:
        obs = t.observation
        out.append({"action": t.action, "text": t.text, "query": t.query_sent,
                    "obs": None if obs is None else obs.kind, "error": None if obs is None else obs.error})
    return out


def _summary_line(preds: Sequence[Mapping]) -> str:
    n = len(preds)
    if n == 0:
        return "no predictions"
    em = sum(float(p.get("em") or 0) for p in preds) / n
    f1 = sum(float(p.get("f1") or 0) for p in preds) / n
    fails = sum(1 for p in preds if not p.get("format_ok"))
    return f"{n} questions · EM {em:.3f} · F1 {f1:.3f} · format failures {fails}"


def render_html(preds: Sequence[Mapping], title: str = "StepSearch trajectories") -> str:
    """The whole page as a string. `preds` are scored predictions (see stepsearch.eval.metrics)."""
    data = json.dumps([_compact(p) for p in preds], ensure_ascii=False)
    data = data.replace("</", "<\\/")   # a literal "</script>" inside the JSON must not end the script element
    buttons = "".join(f'<button data-filter="{f}">{label}</button>' for f, label in
                      (("all", "all"), ("correct", "correct"), ("wrong", "wrong"), ("format_fail", "format failure")))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{html.escape(_summary_line(preds))}</p>"
            f"<div class='bar'>{buttons}<input id='q' placeholder='search text…'><span id='count'></span></div>"
            f"<div id='list'></div><script type='application/json' id='data'>{data}</script>"
            f"<script>{_JS}</script></body></html>")


def write_report(preds: Sequence[Mapping], out_path: str, title: str = "StepSearch trajectories") -> str:
    with atomic_path(out_path, suffix=".html") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render_html(preds, title))
    return out_path
