import argparse
from pathlib import Path

import pytest
import yaml
from common import add_common_args, resolve_config

from dsonas.config import Config, config_to_dict, dump_config, load_config, parse_override
from dsonas.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_yaml_matches_dataclass_defaults():
    # The file and the dataclasses must not drift apart: keys a file omits fall back to the dataclasses.
    assert load_config(CONFIGS / "default.yaml") == Config()
    assert load_config() == Config()


def test_paper_configs_load_with_paper_values():
    share = load_config(CONFIGS / "cifar10_share.yaml")
    assert (share.space.kind, share.skeleton.stages, share.skeleton.filters) == ("share", [8, 8, 8], 48)
    assert (share.pretrain.epochs, share.search.epochs, share.retrain.epochs) == (120, 120, 630)
    assert (share.retrain.dropout, share.retrain.cutout, share.retrain.drop_path) == (0.6, 16, 0.5)
    assert share.search.penalty == "flops" and share.data.split_ratio == [1, 1]
    full = load_config(CONFIGS / "cifar10_full.yaml")
    assert full.space.kind == "full"
    assert config_to_dict(full)["retrain"] == config_to_dict(share)["retrain"]
    imagenet = load_config(CONFIGS / "imagenet_share.yaml")
    assert imagenet.skeleton.stages == [2, 2, 13, 6] and imagenet.data.split_ratio == [4, 1]
    retrain = imagenet.retrain
    assert (retrain.schedule, retrain.lr_max, retrain.lr_min) == ("linear", 0.5, 0.0)
    assert imagenet.retrain.label_smoothing == 0.1 and imagenet.data.source == "imagenet_rec"


@pytest.mark.parametrize("override, key", [
    ("search.gamm=0.1", "search.gamm"),
    ("bogus=1", "bogus"),
    ("data.source.kind=x", "data.source"),
])
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  gama: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key search\.gama"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("search.epochs=true", "search.epochs"),       # bool is not an int
    ("search.epochs=2.5", "search.epochs"),
    ("search.gamma=abc", "search.gamma"),
    ("search.gamma=true", "search.gamma"),         # nor a float
    ("search.split=1", "search.split"),            # and an int is not a bool
    ("data.split_ratio=3", "data.split_ratio"),
    ("data.split_ratio=[1, 1.5]", r"data.split_ratio\[1\]"),
    ("skeleton.stages=[2, x]", r"skeleton.stages\[1\]"),
    ("data.source=[digits]", "data.source"),
    ("space=3", "space"),
    ("data.batch_size=", "data.batch_size"),      # null where a value is required
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("search.penalty=flop", "search.penalty"),
    ("data.source=mnist", "data.source"),
    ("search.epochs=0", "search.epochs"),
    ("retrain.epochs=-1", "retrain.epochs"),
    ("data.batch_size=0", "data.batch_size"),
    ("retrain.batch_size=0", "retrain.batch_size"),
    ("search.ratio=[1, 0]", r"search.ratio\[1\]"),
    ("search.ratio=[1, 1, 1]", "search.ratio"),
    ("data.split_ratio=[0, 1]", r"data.split_ratio\[0\]"),
    ("search.lr=0", "search.lr"),
    ("search.momentum=1.0", "search.momentum"),
    ("search.gamma=-0.1", "search.gamma"),
    ("search.gamma=.nan", "search.gamma"),
    ("retrain.dropout=1", "retrain.dropout"),
    ("retrain.lr_min=0.1", "retrain.lr_min"),       # above lr_max
    ("space.ops=[]", "space.ops"),
    ("space.ops=[max_pool_3x3, max_pool_3x3]", "space.ops"),
    ("runtime.ctx=[gpu0]", r"runtime.ctx\[0\]"),
    ("runtime.kvstore=mpi", "runtime.kvstore"),
    ("name=../escape", "name"),
])
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["search.gamma=1e-4", "search.lr=1", "data.split_ratio=[4, 1]",
                             "data.limit_train=500", "skeleton.num_classes=null", "search.split=false",
                             "runtime.ctx=[gpu(0), gpu(1)]"])
    assert cfg.search.gamma == pytest.approx(1e-4) and isinstance(cfg.search.gamma, float)
    assert cfg.search.lr == 1.0 and isinstance(cfg.search.lr, float)   # int accepted where float expected
    assert cfg.data.split_ratio == [4, 1] and cfg.data.limit_train == 500
    assert cfg.skeleton.num_classes is None and cfg.search.split is False
    assert cfg.runtime.ctx == ["gpu(0)", "gpu(1)"]


def test_string_keys_keep_the_raw_text():
    assert parse_override("name=007") == ("name", "007")
    assert parse_override("data.root=123") == ("data.root", "123")
    assert parse_override("data.root=") == ("data.root", None)
    assert load_config(None, ["name=007"]).name == "007"


def test_later_override_wins():
    assert load_config(None, ["search.gamma=0.1", "search.gamma=0.2"]).search.gamma == 0.2


@pytest.mark.parametrize("text", ["novalue", "=3", "search.gamma=[1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [text])


def test_malformed_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("search:\n  gamma: [0.1\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("search:\n  gamma: 0.5\n")
    cfg = load_config(path)
    assert cfg.search.gamma == 0.5 and cfg.search.epochs == Config().search.epochs


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "cifar10_share.yaml", ["search.gamma=0.003", "data.limit_train=100"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)


def _args(*argv, space=True):
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    if space:
        parser.add_argument("--space")
    return parser.parse_args(list(argv))


def test_cli_shortcuts_and_set_precedence(tmp_path):
    cfg = resolve_config(_args("--config", str(CONFIGS / "cifar10_share.yaml"), "--space", "full",
                               "--data", "npz", "--data-root", str(tmp_path / "x.npz"), "--name", "try1",
                               "--gpus", "0,1", "--kvstore", "local",
                               "--set", "search.gamma=0.002", "--set", "space.kind=share"))
    assert cfg.space.kind == "share"             # --set wins over the shortcut
    assert (cfg.data.source, cfg.data.root, cfg.name) == ("npz", str(tmp_path / "x.npz"), "try1")
    assert cfg.runtime.ctx == ["gpu(0)", "gpu(1)"] and cfg.runtime.kvstore == "local"
    assert cfg.search.gamma == 0.002 and cfg.skeleton.stages == [8, 8, 8]


def test_cli_errors():
    assert resolve_config(_args("--ctx", "cpu", space=False)).runtime.ctx == ["cpu"]
    with pytest.raises(ConfigError, match="--ctx and --gpus"):
        resolve_config(_args("--ctx", "cpu", "--gpus", "0"))
    with pytest.raises(ConfigError, match="--gpus"):
        resolve_config(_args("--gpus", "a,b"))
    with pytest.raises(ConfigError, match="data.source"):
        resolve_config(_args("--data", "imagenet"))
    with pytest.raises(ConfigError, match="space.kind"):
        resolve_config(_args("--space", "bogus"))


def test_space_shuffle_without_config_loads_shuffle_default():
    cfg = resolve_config(_args("--space", "shuffle"))
    assert (cfg.space.kind, cfg.skeleton.kind, cfg.space.merge) == ("shuffle", "shuffle_cifar", "sum")
    assert cfg.name == "shuffle_default"
    assert resolve_config(_args("--space", "shuffle", "--set", "space.merge=concat")).space.merge == "concat"
    explicit = resolve_config(_args("--space", "shuffle", "--config", str(CONFIGS / "default.yaml")))
    assert (explicit.space.kind, explicit.skeleton.kind) == ("shuffle", "cifar")  # --config still wins
    assert resolve_config(_args("--space", "full")).skeleton.kind == "cifar"


def test_space_ops_may_name_an_op_set(tmp_path):
    cfg = load_config(None, ["space.ops=mobile"])
    assert cfg.space.ops == ["mbconv_k3_e3", "mbconv_k3_e6", "mbconv_k5_e3", "mbconv_k5_e6"]
    path = tmp_path / "shuffle_ops.yaml"
    path.write_text("space:\n  ops: shufflenet_v2\n")
    assert load_config(path).space.ops == ["conv_1x1", "dw_conv_3x3"]
    assert yaml.safe_load(dump_config(cfg))["space"]["ops"] == cfg.space.ops  # saved expanded
    with pytest.raises(ConfigError, match="space.ops") as info:
        load_config(None, ["space.ops=mobil"])
    assert "'mobil'" in str(info.value) and "dso, shuffle, shufflenet_v2, mobile" in str(info.value)
