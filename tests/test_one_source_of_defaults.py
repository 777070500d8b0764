"""One source for every default (docs/configuration.md): configs/ppo_trainer.yaml.

Each test fails when a default appears in a second place: a config dataclass field with a literal default for a
key the YAML holds, a model config restating the base value, a YAML key no schema reads, a server flag with its own
default, or a ``.get(key, default)`` on a config mapping.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from stepsearch.agent.agent_config import AgentConfig
from stepsearch.rewards.reward_config import RewardConfig
from stepsearch.search.server import build_parser, parse_args
from stepsearch.search.server_config import ServerConfig
from stepsearch.train import RetrieverConfig
from verl.utils import hydra_to_dataclass as C
from verl.workers import worker_config as W
from verl.workers.fsdp_workers import WorkerConfig

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "configs" / "ppo_trainer.yaml").read_text())

# Each schema and the YAML section whose keys it reads (AgentConfig also reads the rollout's sampling keys).
SCHEMAS = [
    (C.DataConfig, "data"), (C.ModelConfig, "model"), (C.TrainerConfig, "trainer"), (C.RayConfig, "ray"),
    (C.AlgorithmConfig, "algorithm"), (C.KLControlConfig, "algorithm.kl_ctrl"),
    (C.ActorRolloutRefConfig, "actor_rollout_ref"), (W.ActorConfig, "actor_rollout_ref.actor"),
    (W.ActorRefModelConfig, "actor_rollout_ref.model"), (C.OptimConfig, "actor_rollout_ref.optim"),
    (C.FSDPConfig, "actor_rollout_ref.fsdp"), (C.RolloutConfig, "actor_rollout_ref.rollout"),
    (W.CriticConfig, "critic"), (C.OptimConfig, "critic.optim"),
    (RewardConfig, "reward"), (AgentConfig, "agent"), (RetrieverConfig, "retriever"),
]
# Literal defaults whose field name is also a YAML key somewhere, each with the reason it is not a second default.
ALLOWED_LITERALS = {
    ("OptimConfig", "weight_decay"): "schema of two YAML sections with different values; both set every field "
                                     "(test_shared_optim_schema_is_never_defaulted_in_a_run)",
    ("OptimConfig", "betas"): "as weight_decay",
    ("OptimConfig", "warmup_ratio"): "as weight_decay (a hand-built OptimConfig: no warm-up)",
    ("OptimConfig", "warmup_steps"): "as weight_decay",
    ("AgentConfig", "seed"): "the loop's per-request seed base, None = the engine's RNG; no YAML key (validation "
                             "sets it from actor_rollout_ref.rollout.seed)",
    ("WorkerConfig", "fsdp"): "default_factory=FSDPConfig, whose fields read the YAML",
    ("WorkerConfig", "rollout"): "default_factory=RolloutConfig, whose fields read the YAML",
    ("AlgorithmConfig", "kl_ctrl"): "default_factory=KLControlConfig, whose fields read the YAML",
}
CONFIG_MODULES = [importlib.import_module(name) for name in (
    "verl.utils.hydra_to_dataclass", "verl.workers.worker_config", "verl.workers.fsdp_workers", "stepsearch.agent.agent_config",
    "stepsearch.rewards.reward_config", "stepsearch.train")]


def _node(tree: dict, path: str):
    for key in path.split("."):
        tree = tree[key]
    return tree


def _leaves(tree: dict, prefix: str = ""):
    """(dotted path, value) of every leaf; an empty mapping (engine_kwargs: {}) is a leaf."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _nested_schemas() -> set[str]:
    return {path for _, path in SCHEMAS}


@pytest.mark.parametrize("cls, section", SCHEMAS, ids=[f"{c.__name__}@{s}" for c, s in SCHEMAS])
def test_fields_that_mirror_a_yaml_key_take_its_value(cls, section):
    """A field whose key is in the section has no default of its own: it reads the YAML (yaml_default) or is
    required. OptimConfig serves two sections and is checked by the test below."""
    node = _node(BASE, section)
    for f in dataclasses.fields(cls):
        if f.name not in node or f"{section}.{f.name}" in _nested_schemas():
            continue
        if cls is C.OptimConfig and (cls.__name__, f.name) in ALLOWED_LITERALS:
            continue
        if _has_default(f):
            assert f.metadata.get("yaml") == f"{section}.{f.name}", (
                f"{cls.__name__}.{f.name} has a default of its own; take it from the YAML: "
                f"yaml_default('{section}.{f.name}')")


def test_every_yaml_key_is_read_by_exactly_one_schema_field():
    """No YAML key without a schema (weight_bucket_mb had none), none read by two."""
    claimed: dict[str, str] = {}
    for cls, section in SCHEMAS:
        for f in dataclasses.fields(cls):
            path = f"{section}.{f.name}"
            if f.name in _node(BASE, section):
                assert path not in claimed, f"{path} read by {claimed[path]} and {cls.__name__}"
                claimed[path] = cls.__name__
    for path, _ in _leaves({k: v for k, v in BASE.items() if k != "hydra"}):
        assert path in claimed, f"YAML key {path} has no schema field; add one that reads it"


def test_no_literal_default_for_a_name_the_yaml_holds():
    """Across every config dataclass: a field with a literal default whose name is a YAML key must be explained."""
    yaml_names = {path.rsplit(".", 1)[-1] for path, _ in _leaves(BASE)} | set(BASE)
    offenders = []
    for module in CONFIG_MODULES:
        for obj in vars(module).values():
            if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)) or obj.__module__ != module.__name__:
                continue
            for f in dataclasses.fields(obj):
                if f.name in yaml_names and _has_default(f) and "yaml" not in f.metadata \
                        and (obj.__name__, f.name) not in ALLOWED_LITERALS:
                    offenders.append(f"{obj.__name__}.{f.name}")
    assert not offenders, f"literal defaults that shadow a YAML key: {offenders}; use yaml_default"


def test_shared_optim_schema_is_never_defaulted_in_a_run():
    """OptimConfig keeps plain defaults for hand-built configs; every YAML optim section sets all of its fields, so a
    Hydra run never uses them, and lr has no default at all."""
    names = {f.name for f in dataclasses.fields(C.OptimConfig)}
    for section in ("actor_rollout_ref.optim", "critic.optim"):
        assert set(_node(BASE, section)) == names, section
    assert not _has_default(next(f for f in dataclasses.fields(C.OptimConfig) if f.name == "lr"))


def test_dataclass_defaults_equal_the_yaml():
    """By construction: a default-built schema holds the YAML's values."""
    assert W.ActorConfig().entropy_coeff == BASE["actor_rollout_ref"]["actor"]["entropy_coeff"]
    assert C.TrainerConfig().default_local_dir == f"outputs/{BASE['trainer']['experiment_name']}"
    assert C.DataConfig().train_files == tuple(BASE["data"]["train_files"])
    assert AgentConfig().max_new_tokens == BASE["actor_rollout_ref"]["rollout"]["max_new_tokens"]
    assert WorkerConfig("m", "m", None).weight_bucket_mb == BASE["actor_rollout_ref"]["weight_bucket_mb"]
    assert WorkerConfig("m", "m", None).optim == C.to_dataclass(C.OptimConfig, BASE["actor_rollout_ref"]["optim"])
    a, b = C.RolloutConfig(), C.RolloutConfig()
    assert a.engine_kwargs == {} and a.engine_kwargs is not b.engine_kwargs  # a fresh mapping each


@pytest.mark.parametrize("name", ["cpu_test", "cpu_demo", "stepsearch_qwen2.5_3b", "stepsearch_qwen2.5_7b"])
def test_model_configs_set_only_what_differs_from_the_base(name):
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    config.pop("defaults")
    base = dict(_leaves(BASE))
    restated = [path for path, value in _leaves(config) if path in base and base[path] == value]
    assert not restated, f"{name}.yaml restates the base value of {restated}; delete those lines"


# ---------------------------------------------------------------- the retrieval server's CLI
def test_server_flags_are_built_from_the_schema():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(ServerConfig):
        if not f.metadata["cli"]:
            assert f.name not in by_dest
            continue
        action = by_dest[f.name]
        assert action.default == f.default and action.help.startswith(f.metadata["help"]), f.name
        flag = f"--no_{f.name}" if f.default is True else f"--{f.name}"
        assert action.option_strings == [flag], f.name
    cfg, _ = parse_args(["--index_dir", "x"])
    assert dataclasses.replace(cfg, token=None) == ServerConfig(index_dir="x")


def test_server_cli_writes_no_default_of_its_own():
    """The only literal defaults in server.py belong to the two flags that are not settings; the one environment
    read (the bearer token) is in one place."""
    source = (REPO / "stepsearch" / "search" / "server.py").read_text()
    literal = [ast.unparse(call) for call in ast.walk(ast.parse(source)) if isinstance(call, ast.Call)
               and getattr(call.func, "attr", "") == "add_argument"
               and any(k.arg == "default" and isinstance(k.value, ast.Constant) for k in call.keywords)]
    assert all("--log_level" in c for c in literal), literal
    environ = len(re.findall(r"os\.environ", source + (REPO / "stepsearch/search/server_config.py").read_text()))
    assert environ == 1


# ---------------------------------------------------------------- no `.get(key, default)` on a config
def _config_keys() -> set[str]:
    keys: set[str] = set()

    def walk(tree):
        for key, value in tree.items():
            keys.add(key)
            if isinstance(value, dict):
                walk(value)
    for path in (REPO / "configs").glob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return keys - {"defaults", "hydra", "run", "dir"}


_CONFIG_NAME = re.compile(r"(^|_|\.)(cfg|config|conf|section|arr)s?($|_|\[|\.)", re.I)
# `.get` calls whose key or receiver looks like a config but which read something else, each with a reason.
ALLOWED_GETS: dict[tuple[str, str], str] = {
    ("verl/workers/rollout/vllm.py", "engine_kw.setdefault('gpu_memory_utilization', 0.1)"):
        "vLLM's own engine argument on a CPU host (cpu_engine_defaults), under whatever engine_kwargs the YAML gives",
    ("verl/workers/rollout/vllm.py", "engine_kw.setdefault('kv_cache_memory_bytes', 256 * 1024 ** 2)"):
        "vLLM's own engine argument on a CPU host (cpu_engine_defaults); configs/cpu_real.yaml sets it in engine_kwargs",
    ("verl/workers/rollout/vllm.py", "engine_kw.setdefault('seed', 0)"):
        "vLLM's engine seed argument (every request carries its own seed), not a config key",
    ("verl/workers/rollout/vllm_async.py", "engine_kw.setdefault('seed', 0)"): "as in vllm.py",
    ("stepsearch/search/native_bert.py", "tok.get('model') or {}"):
        "the `model` section of a Hugging Face tokenizer.json, not the config's model section",
    ("stepsearch/search/native_bert.py", "tok_cfg.get('tokenize_chinese_chars', True)"):
        "a model folder's tokenizer_config.json field, defaulted as transformers' BertTokenizer does",
    ("stepsearch/search/native_bert.py", "tok_cfg.get('do_lower_case', True)"): "as tokenize_chinese_chars",
    ("stepsearch/search/native_bert.py", "tok_cfg.get('pad_token', '[PAD]')"): "as tokenize_chinese_chars",
}


def _defaulted_gets(tree: ast.AST):
    """`x.get("k", d)`, `x.pop("k", d)`, `x.setdefault("k", d)` and `x.get("k") or d` calls in a module."""
    def keyed(node, methods, nargs):
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and len(node.args) + len(node.keywords) == nargs)
    for node in ast.walk(tree):
        if keyed(node, ("get", "pop", "setdefault"), 2):
            yield node, node
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and keyed(node.values[0], ("get",), 1):
            yield node, node.values[0]


def test_no_get_with_a_default_on_a_config():
    keys = _config_keys()
    found = []
    for root in ("verl", "stepsearch"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for whole, call in _defaulted_gets(ast.parse(path.read_text())):
                receiver, key = ast.unparse(call.func.value), call.args[0].value
                if (key in keys or _CONFIG_NAME.search(receiver)) and (rel, ast.unparse(whole)) not in ALLOWED_GETS:
                    found.append(f"{rel}:{whole.lineno}: {ast.unparse(whole)}")
    assert not found, ("a config key read with a default of its own (the default belongs in configs/"
                       f"ppo_trainer.yaml; use the typed config or config_section): {found}")


def test_the_get_scan_finds_what_it_looks_for():
    """The scan itself: it flags a defaulted get on a config and leaves a record's optional field alone."""
    source = "a = cfg.get('lr', 1e-6)\nb = config.get('agent') or {}\nc = row.get('title') or ''\nd = arr.pop('optim', {})"
    flagged = [ast.unparse(w) for w, _ in _defaulted_gets(ast.parse(source))]
    assert flagged == ["cfg.get('lr', 1e-06)", "config.get('agent') or {}", "row.get('title') or ''",
                       "arr.pop('optim', {})"]
    keys = _config_keys()
    assert {"lr", "agent", "optim"} <= keys and "title" not in keys and not _CONFIG_NAME.search("row")
