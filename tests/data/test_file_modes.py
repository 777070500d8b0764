"""Every file the tools write follows the umask (0o666 & ~umask), atomic writes included: mkstemp alone gives 0600.

The writers run in a child process that sets each umask under test, so this process's umask is never changed.
"""
import os
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

UMASKS = {0o022: (0o644, 0o755), 0o027: (0o640, 0o750)}  # umask -> (file mode, folder mode)

# Runs in a child process: for each umask, set it and write one of each output kind into OUT/<umask in octal>/.
WRITERS = r"""
import os, sys
from stepsearch.data.formats import QAExample, to_row, write_rows_parquet
from stepsearch.data.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from stepsearch.rewards import RewardConfig
from stepsearch.rewards.score import score_file
from stepsearch.search.build_index import BuildConfig, build_index
from stepsearch.viz.curves import plot_training_curves
from stepsearch.viz.report import write_report
from tests.viz.test_report import sample_predictions

ex = QAExample(id="q0", question="Who founded Citibank?", answers=("Samuel Osgood",))
for mask in map(int, sys.argv[2:]):
    os.umask(mask)
    out = os.path.join(sys.argv[1], oct(mask))
    write_rows_parquet([to_row(ex, "bamboogle", "test", 0)], os.path.join(out, "rows.parquet"))
    write_json_atomic(os.path.join(out, "summary.json"), {"em": 1.0})
    write_jsonl_atomic(os.path.join(out, "corpus.jsonl"),
                       [{"id": str(i), "contents": f'"Person {i}"\nPerson {i} was born in Town {i}.'}
                        for i in range(30)])
    write_text_atomic(os.path.join(out, "table.md"), "| a |\n")
    plot_training_curves([{"step": 1, "critic/score/mean": 0.1}, {"step": 2, "critic/score/mean": 0.3}],
                         os.path.join(out, "curves.png"))
    write_report(sample_predictions(), os.path.join(out, "report.html"))
    with open(os.path.join(out, "rollouts.jsonl"), "w") as f:
        f.write('{"response": "<answer> Samuel Osgood </answer>", "ground_truth": {"target": ["Samuel Osgood"]}}\n')
    score_file(os.path.join(out, "rollouts.jsonl"), os.path.join(out, "scores.jsonl"), RewardConfig())
    build_index(BuildConfig(corpus=os.path.join(out, "corpus.jsonl"), out=os.path.join(out, "index"),
                            method="bm25", quiet=True))
"""
EXPECTED = ("rows.parquet", "summary.json", "corpus.jsonl", "table.md", "curves.png", "report.html", "scores.jsonl",
            "index/manifest.json", "index/corpus.arrow")

# Model folders: the critic's save_pretrained (HF backbone, whose safetensors 0.8 writes 0600, plus the value
# head) and the warm start's save_model_dir (HF model + tokenizer, swapped in from a temp folder).
MODEL_FOLDERS = r"""
import os, sys
from stepsearch.envs.warmstart import save_model_dir
from verl.models.value_model import CausalLMWithValueHead
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer

tok = build_tokenizer(["a b c d"], vocab_size=300)
lm = build_tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2)
for mask in map(int, sys.argv[2:]):
    os.umask(mask)
    CausalLMWithValueHead.from_causal_lm(lm).save_pretrained(os.path.join(sys.argv[1], oct(mask), "critic"))
    save_model_dir(lm, tok, os.path.join(sys.argv[1], oct(mask), "sft_model"))
"""


def modes_under(folder) -> dict[str, int]:
    """{path relative to folder: permission bits} of everything below folder."""
    modes = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            modes[os.path.relpath(path, folder)] = stat.S_IMODE(os.lstat(path).st_mode)
    return modes


def check_modes_under_umasks(code: str, tmp_path, expected: tuple[str, ...]) -> None:
    """Run `code` (argv: out folder, then the umasks) and check every file and folder it wrote, per umask."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *map(str, UMASKS)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for umask, (file_mode, dir_mode) in UMASKS.items():
        out = tmp_path / oct(umask)
        modes = modes_under(out)
        assert set(expected) <= set(modes), sorted(modes)
        assert not [n for n in modes if n.endswith(".tmp")]  # no temp file left behind
        wrong = {n: oct(m) for n, m in modes.items() if m != (dir_mode if (out / n).is_dir() else file_mode)}
        assert wrong == {}, f"umask {oct(umask)}"


def test_tool_outputs_follow_the_umask(tmp_path):
    check_modes_under_umasks(WRITERS, tmp_path, EXPECTED)


def test_model_folders_follow_the_umask(tmp_path):
    check_modes_under_umasks(MODEL_FOLDERS, tmp_path, ("critic/value_head.safetensors", "critic/model.safetensors",
                                                       "sft_model/model.safetensors", "sft_model/tokenizer.json"))


def test_current_umask_reads_without_changing_it():
    code = ("import os\nfrom stepsearch.data.io import current_umask, new_file_mode\n"
            "print(oct(current_umask()), oct(new_file_mode()), oct(os.umask(0)))")
    proc = subprocess.run([sys.executable, "-c", code], umask=0o027, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["0o27", "0o640", "0o27"], proc.stderr  # the last: the umask is still 027
