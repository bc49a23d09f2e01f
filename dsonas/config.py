"""YAML configs validated into nested dataclasses.

Every run is described by one `Config`: the YAML file gives the values, `--set section.key=value`
overrides change single keys, and the resolved config is saved into the run folder so a run can always be
reproduced. Validation is strict on purpose: a typo in a key or a wrong type would otherwise silently
fall back to a default and waste hours of search, so every problem raises a one-line `ConfigError`
naming the dotted key.

Field metadata drives the checks: `choices` (allowed values), `min`/`max` (inclusive bounds),
`exclusive_min`, `below` (exclusive upper bound), `pattern`, and for lists `length`, `min_length`,
`unique`, `item_min`, `item_pattern` and `presets` (names standing for whole lists: `space.ops: mobile`).
"""

import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from .errors import ConfigError
from .space import BYPASSES, OP_SETS, SHUFFLE_KINDS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# The shuffle space needs a shuffle_* skeleton, which default.yaml's cifar one is not.
SHUFFLE_CONFIG = DEFAULT_CONFIG.parent / "shuffle_default.yaml"


def _f(default, **checks):
    """A dataclass field with validation metadata; list defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=checks)
    return field(default=default, metadata=checks)


@dataclass
class DataConfig:
    source: str = _f("digits", choices=("digits", "cifar10", "npz", "folder", "imagenet_rec"))
    root: str | None = _f(None)
    input_size: int = _f(32, min=8)
    split_ratio: list[int] = _f([1, 1], length=2, item_min=1)
    batch_size: int = _f(64, min=1)
    test_batch_size: int = _f(256, min=1)
    cutout: int = _f(0, min=0)
    num_workers: int = _f(0, min=0)
    limit_train: int | None = _f(None, min=1)


@dataclass
class SpaceConfig:
    kind: str = _f("share", choices=("share", "full", "shuffle"))
    levels: int = _f(4, min=1)
    ops: list[str] = _f(
        ["sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3"], min_length=1, unique=True,
        presets=OP_SETS,
    )
    merge: str = _f("concat", choices=("concat", "sum"))
    sep_repeats: int = _f(1, min=1)


@dataclass
class SkeletonConfig:
    kind: str = _f("cifar", choices=("cifar", "imagenet", "shuffle_cifar", "shuffle_imagenet"))
    filters: int = _f(16, min=1)
    stages: list[int] = _f([2, 2, 2], min_length=1, item_min=1)
    num_classes: int | None = _f(None, min=2)
    # shuffle skeletons: the downsampling units' second path; null = the kind's default (dsonas.space)
    bypass: str | None = _f(None, choices=BYPASSES)


@dataclass
class PretrainConfig:
    # 0 epochs is allowed: it skips pre-training (the paper's "no pre-train" ablation).
    epochs: int = _f(2, min=0)
    lr: float = _f(0.1, min=0.0, exclusive_min=True)
    momentum: float = _f(0.9, min=0.0, below=1.0)
    wd: float = _f(3e-4, min=0.0)


@dataclass
class SearchConfig:
    epochs: int = _f(8, min=1)
    lr: float = _f(0.1, min=0.0, exclusive_min=True)
    momentum: float = _f(0.9, min=0.0, below=1.0)
    wd: float = _f(3e-4, min=0.0)
    lambda_lr: float = _f(0.1, min=0.0, exclusive_min=True)
    lambda_momentum: float = _f(0.9, min=0.0, below=1.0)
    gamma: float = _f(0.04, min=0.0)
    ratio: list[int] = _f([1, 1], length=2, item_min=1)
    split: bool = _f(True)
    penalty: str = _f("none", choices=("none", "flops", "mac", "latency"))
    penalty_every: int = _f(1, min=1)
    prune_every: int = _f(0, min=0)
    shrink: bool = _f(True)
    max_inputs_per_op: int | None = _f(None, min=1)


@dataclass
class RetrainConfig:
    epochs: int = _f(10, min=1)
    batch_size: int = _f(64, min=1)
    lr_max: float = _f(0.05, min=0.0, exclusive_min=True)
    lr_min: float = _f(0.001, min=0.0)
    schedule: str = _f("cosine_restarts", choices=("cosine_restarts", "cosine", "linear", "constant"))
    t0: int = _f(10, min=1)
    tmul: int = _f(2, min=1)
    momentum: float = _f(0.9, min=0.0, below=1.0)
    wd: float = _f(3e-4, min=0.0)
    dropout: float = _f(0.0, min=0.0, below=1.0)
    drop_path: float = _f(0.0, min=0.0, below=1.0)
    cutout: int = _f(0, min=0)
    aux_weight: float = _f(0.0, min=0.0)
    label_smoothing: float = _f(0.0, min=0.0, below=1.0)
    width_mult: float = _f(1.0, min=0.0, exclusive_min=True)
    channel_divisor: int = _f(8, min=1)


_CTX = re.compile(r"^(cpu|gpu)(\(\d+\))?$")
_KVSTORES = ("local", "device", "nccl", "dist_sync", "dist_device_sync", "dist_async")


@dataclass
class RuntimeConfig:
    ctx: list[str] = _f(["cpu"], min_length=1, unique=True, item_pattern=_CTX)
    kvstore: str = _f("device", choices=_KVSTORES)
    threads: int | None = _f(None, min=1)
    recompute: bool = _f(False)


@dataclass
class Config:
    name: str = _f("default", pattern=re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))
    seed: int = _f(0, min=0)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    skeleton: SkeletonConfig = field(default_factory=SkeletonConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ----------------------------------------------------------------------------------------------------------
# loading


def load_config(path=None, overrides=(), values=None):
    """Load a YAML config, apply overrides, validate, and return a `Config`.

    path None loads the repository's configs/default.yaml (the plain defaults if it is not there).
    `values` maps dotted keys to already-typed Python values (CLI shortcuts such as --data-root);
    `overrides` are "dotted.key=value" strings whose value is parsed as YAML (`--set`). Overrides win.
    Keys missing from the file keep their dataclass defaults.
    """
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    raw = _read_yaml(path) if path is not None else {}
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, prefix="")
    _check_cross_fields(cfg)
    return cfg


def parse_override(text):
    """Split "a.b=value" and parse value as a YAML scalar or list; str-typed keys keep the raw text."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. search.gamma=0.001)")
    hint = _field_type(key)
    if hint is not None and _base_types(hint) == {str}:
        # A name like "001" or a path like "123" must stay a string, not become an int.
        return key, None if value_text.strip() in ("", "null", "~") else value_text
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_reason(e)})") from None
    return key, value


def config_to_dict(cfg):
    """The config as plain dicts and lists (what is saved as config.yaml in the run folder)."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[f.name] = value
    return out


def dump_config(cfg):
    """YAML text of the config, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing file to --config (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_reason(e)}; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_reason(error):
    """One line from a PyYAML error: the problem and its line number."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def _set_dotted(raw, key, value):
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _field_type(dotted):
    """The annotated type of a dotted key, or None if the key does not exist (reported later)."""
    cls = Config
    hint = None
    for part in dotted.split("."):
        if cls is None:
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        hint = hints[part]
        cls = hint if is_dataclass(hint) else None
    return hint


def _base_types(hint):
    """Non-None members of a type hint: `int | None` -> {int}."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return {a for a in typing.get_args(hint) if a is not type(None)}
    return {hint}


# ----------------------------------------------------------------------------------------------------------
# validation


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(raw)}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            where = prefix.rstrip(".") or "top level"
            raise ConfigError(f"unknown key {prefix}{key} (known keys in {where}: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        dotted = prefix + name
        hint = hints[name]
        if is_dataclass(hint):
            kwargs[name] = _build(hint, raw.get(name, {}), dotted + ".")
        elif name in raw:
            kwargs[name] = _check_value(dotted, raw[name], hint, f.metadata)
    return cls(**kwargs)


def _check_value(key, value, hint, meta):
    allowed = _base_types(hint)
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key}: a value is required (got null)")
    (base,) = allowed
    if typing.get_origin(base) is list:
        (item_type,) = typing.get_args(base)
        presets = meta.get("presets")
        if presets is not None and isinstance(value, str):
            # Expanded here, so the saved config.yaml lists the ops the run really used.
            if value not in presets:
                raise ConfigError(f"{key}: unknown name {value!r}; give a list or one of the names "
                                  f"{', '.join(presets)}")
            value = list(presets[value])
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {_show(value)}")
        value = [_check_scalar(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
        _check_list(key, value, meta)
        return value
    value = _check_scalar(key, value, base)
    _check_bounds(key, value, meta)
    return value


def _check_scalar(key, value, expected):
    # bool is a subclass of int in Python: reject it explicitly where a number is expected.
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if expected is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {expected} for {key}")


def _check_bounds(key, value, meta):
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    pattern = meta.get("pattern")
    if pattern is not None and not pattern.match(value):
        raise ConfigError(f"{key}: {value!r} is not allowed (use letters, digits, '.', '_' or '-')")
    low = meta.get("min")
    if low is not None:
        if meta.get("exclusive_min") and value <= low:
            raise ConfigError(f"{key}: must be > {low}, got {value}")
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    below = meta.get("below")
    if below is not None and value >= below:
        raise ConfigError(f"{key}: must be < {below}, got {value}")


def _check_list(key, value, meta):
    length = meta.get("length")
    if length is not None and len(value) != length:
        raise ConfigError(f"{key}: expected exactly {length} values, got {len(value)}")
    min_length = meta.get("min_length")
    if min_length is not None and len(value) < min_length:
        raise ConfigError(f"{key}: expected at least {min_length} value(s), got {len(value)}")
    item_min = meta.get("item_min")
    pattern = meta.get("item_pattern")
    for i, item in enumerate(value):
        if item_min is not None and item < item_min:
            raise ConfigError(f"{key}[{i}]: must be >= {item_min}, got {item}")
        if pattern is not None and not pattern.match(item):
            raise ConfigError(f"{key}[{i}]: {item!r} is not a device (use cpu, gpu(0), gpu(1), ...)")
    if meta.get("unique") and len(set(value)) != len(value):
        raise ConfigError(f"{key}: duplicate entries in {value}")


def _check_cross_fields(cfg):
    r = cfg.retrain
    if r.schedule != "constant" and r.lr_min > r.lr_max:
        raise ConfigError(f"retrain.lr_min: must be <= retrain.lr_max ({r.lr_max}), got {r.lr_min}")
    if cfg.skeleton.bypass is not None and cfg.skeleton.kind not in SHUFFLE_KINDS:
        raise ConfigError(f"skeleton.bypass: only shuffle skeletons have bypass paths, not "
                          f"{cfg.skeleton.kind!r}; set it to null")


def _show(value):
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
