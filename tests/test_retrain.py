"""Compile, retrain and evaluate derived nets: costs, width, the training loop, exact resume, the tool."""

import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from dsonas import cost
from dsonas import retrain as rt
from dsonas.config import config_to_dict, load_config
from dsonas.errors import BudgetError, ConfigError, GenotypeError
from dsonas.genotype import BlockMask, Genotype
from dsonas.network import compile_genotype
from dsonas.runs import RunDir
from dsonas.schedule import make_schedule
from dsonas.shuffle import shufflenet_v2_genotype
from dsonas.space import BlockSpec, Skeleton

SPEC = BlockSpec(levels=2, ops=("sep_conv_3x3", "max_pool_3x3"))
# Level 1: sep3 and max-pool on the input; level 2: sep3 on both, its max-pool pruned.
PARTIAL = BlockMask(inputs=((0,), (0,), (0, 1, 2), ()), outputs=(1, 2))
IDENTITY = BlockMask(inputs=((), (), (), ()), outputs=())
# Enough of the recipe switched on to run every path of the loop, on 8 training batches of digits.
TINY = ["data.input_size=16", "data.limit_train=256", "data.test_batch_size=400", "retrain.batch_size=32",
        "retrain.epochs=2", "retrain.schedule=cosine_restarts", "retrain.t0=1", "retrain.tmul=2",
        "retrain.lr_max=0.1", "retrain.aux_weight=0.4", "retrain.drop_path=0.2", "retrain.dropout=0.1",
        "retrain.label_smoothing=0.1", "retrain.cutout=4"]


def genotype(masks=(PARTIAL,), stages=(1, 1), filters=8, size=16):
    shared = len(masks) == 1
    return Genotype(Skeleton("cifar", filters, stages, 10, size), SPEC, shared, list(masks))


def learnable_params(net):
    """Parameters a trainer updates, counted from the built net (BN running statistics excluded)."""
    net.initialize()
    return sum(p.data().size for p in net.collect_params().values() if p.grad_req != "null")


def test_pruned_genotype_builds_only_kept_ops_and_matches_cost_count():
    full = genotype([BlockMask.full(SPEC)] * 2)
    pruned = genotype([PARTIAL, IDENTITY])
    net = compile_genotype(pruned)
    counted = cost.count(net, rt.input_shape(pruned)).params
    assert learnable_params(net) == counted
    assert counted < cost.count(compile_genotype(full), rt.input_shape(full)).params
    # The identity block builds nothing; the pruned op slot of the other block is absent.
    names = list(net._collect_params_with_prefix())  # structural names, as save_parameters writes them
    assert not any(name.startswith("cell1.") for name in names)
    for slot, built in ((0, True), (1, True), (2, True), (3, False)):
        assert any(name.startswith(f"cell0.op{slot}.") for name in names) == built, slot


def test_width_multiplier_scales_params_about_quadratically():
    g = genotype(filters=16)
    base = cost.count(rt.deploy_net(g, 1.0), rt.input_shape(g)).params
    double = cost.count(rt.deploy_net(g, 2.0), rt.input_shape(g)).params
    half = cost.count(rt.deploy_net(g, 0.5), rt.input_shape(g)).params
    assert 3.3 < double / base < 4.2
    assert 0.22 < half / base < 0.32


def test_budget_width_falls_back_to_a_finer_divisor_or_names_the_reachable_range():
    g = genotype(filters=16)
    # Halfway (geometrically) between widths 1.5 and 2 in multiples of 8, 12% from each step.
    steps = [cost.count(rt.deploy_net(g, w), rt.input_shape(g)).params for w in (1.5, 2.0)]
    target = (steps[0] * steps[1]) ** 0.5
    sol = rt.width_for_budget(g, "params", target)
    assert sol.channel_divisor < 8
    assert cost.count(rt.deploy_net(g, sol.width_mult, sol.channel_divisor), rt.input_shape(g)).params \
        == sol.cost == pytest.approx(target, rel=0.02)
    macs = cost.count(rt.deploy_net(g, 1.5), rt.input_shape(g)).macs
    assert rt.width_for_budget(g, "flops", 2 * macs).cost == pytest.approx(2 * macs, rel=0.02)  # in FLOPs
    refusal = (r"--target-flops .* with channel divisors 8, 4, 2, 1: .*out of reach: "
               r"width multipliers 0.1..4.0 give [\d.]+M MACs..[\d.]+M MACs; choose a target")
    with pytest.raises(BudgetError, match=refusal):
        rt.width_for_budget(g, "flops", 1e15)


def test_budget_divisors_are_the_configured_one_then_finer_ones_the_skeleton_builds():
    shuffled = shufflenet_v2_genotype("shuffle_cifar", 8, (1, 1), 10, 8)
    assert rt.budget_divisors(genotype(), 8) == (8, 4, 2, 1)
    assert rt.budget_divisors(genotype(), 3) == (3, 2, 1)
    assert rt.budget_divisors(shuffled, 16) == (16, 8, 4, 2)  # units halve their widths: even only
    with pytest.raises(ConfigError, match="retrain.channel_divisor: 3 cannot build a shuffle_cifar"):
        rt.deploy_net(shuffled, 1.5, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 2-epoch retrain, shared by the tests below."""
    cfg = load_config(None, TINY)
    run = RunDir.create(tmp_path_factory.mktemp("runs"), "straight", config_to_dict(cfg))
    result = rt.retrain(cfg, genotype(), run, [mx.cpu()], log=lambda msg: None)
    return cfg, run, result


def test_two_epochs_lower_the_loss_and_leave_a_complete_run_folder(trained):
    cfg, run, result = trained
    records = run.read_metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert records[1]["test_loss"] < records[0]["test_loss"]
    assert records[0]["drop_path"] == 0.0 and records[1]["drop_path"] == pytest.approx(0.1)
    # The recorded lr is that of each epoch's last step (8 steps an epoch): the schedule, per iteration.
    schedule = make_schedule(cfg.retrain, 8)
    assert [r["lr"] for r in records] == [schedule(8), schedule(16)]
    assert schedule(8) < 0.1 * cfg.retrain.lr_max < schedule(9)  # t0 = 1: a warm restart at epoch 1
    for name in ("best.params", "last.params", "genotype.json", "retrain.json", "checkpoints/retrain.ckpt"):
        assert (run.path / name).is_file(), name
    summary = json.loads((run.path / "retrain.json").read_text())
    assert summary["best_acc"] == result.best_acc == max(r["test_acc"] for r in records)
    assert summary["width_mult"] == 1.0 and summary["channel_divisor"] == 8
    assert summary["params"] == result.params


def test_eval_only_reproduces_the_best_accuracy_without_the_aux_head(trained):
    cfg, run, result = trained
    width, divisor = rt.saved_width(run.path / "best.params")
    assert (width, divisor) == (1.0, 8)
    res = rt.evaluate_params(cfg, genotype(), str(run.path / "best.params"), width, [mx.cpu()], divisor)
    assert res["test_acc"] == pytest.approx(result.best_acc)
    assert res["params"] == result.params
    with pytest.raises(GenotypeError, match="does not fit this genotype at width multiplier 2"):
        rt.evaluate_params(cfg, genotype(), str(run.path / "best.params"), 2.0, [mx.cpu()])


def interrupted_and_resumed(cfg, folder):
    """A run stopped (Ctrl-C) right after epoch 1 was recorded, then resumed to the end."""
    run = RunDir.create(folder, "interrupted", config_to_dict(cfg))
    original = run.write_metrics

    def stop_after_first_epoch(record):
        original(record)
        raise KeyboardInterrupt

    run.write_metrics = stop_after_first_epoch
    with pytest.raises(KeyboardInterrupt):
        rt.retrain(cfg, genotype(), run, [mx.cpu()], log=lambda msg: None)
    resumed = RunDir.create(folder, "interrupted", config_to_dict(cfg), resume=True)
    rt.retrain(cfg, genotype(), resumed, [mx.cpu()], resume=True, log=lambda msg: None)
    return resumed


EXACT = ("epoch", "iteration", "lr", "drop_path")
MEASURED = ("train_loss", "train_acc", "test_loss", "test_acc")


def final_weights(run):
    return {k: v.asnumpy() for k, v in mx.nd.load(str(run.path / "last.params")).items()}


def test_resume_continues_the_schedule(trained, tmp_path):
    """Same lr at every epoch end, same update count, same weights up to the engine's float noise.

    MXNet's threaded engine with oneDNN and 2+ OpenMP threads is not bitwise reproducible even without a
    resume (two straight runs differ from epoch 2 on, by up to ~1% of a weight's range here); forgetting
    the momentum on resume moves weights by ~35%, so a 5% bound still catches a broken resume. The slow
    test below checks bit-exactness on the NaiveEngine.
    """
    cfg, straight, _ = trained
    resumed = interrupted_and_resumed(cfg, tmp_path)
    a, b = straight.read_metrics(), resumed.read_metrics()
    assert [[r[k] for k in EXACT] for r in a] == [[r[k] for k in EXACT] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in MEASURED:
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=0.01), (ra["epoch"], k)
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys()
    for name in wa:
        scale = np.abs(wa[name]).max() + 1e-12
        assert np.abs(wa[name] - wb[name]).max() / scale < 0.05, name


@pytest.mark.slow
def test_resume_is_bit_exact_on_the_naive_engine(trained, tmp_path):
    """Interrupted after epoch 1 and resumed == uninterrupted, bit for bit (child process, NaiveEngine)."""
    if os.environ.get("MXNET_ENGINE_TYPE") != "NaiveEngine":
        env = {**os.environ, "MXNET_ENGINE_TYPE": "NaiveEngine"}
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                                f"{__file__}::test_resume_is_bit_exact_on_the_naive_engine"],
                               env=env, capture_output=True, text=True, timeout=900)
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
        return
    cfg, straight, _ = trained
    resumed = interrupted_and_resumed(cfg, tmp_path)
    keys = EXACT + MEASURED
    assert [[r[k] for k in keys] for r in straight.read_metrics()] == \
        [[r[k] for k in keys] for r in resumed.read_metrics()]
    wa, wb = final_weights(straight), final_weights(resumed)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_two_devices_and_a_resume_that_extends_the_epochs(tmp_path):
    """split_and_load over two CPU contexts; a finished run resumed with more epochs keeps its schedule."""
    devices = [mx.cpu(0), mx.cpu(1)]
    short = load_config(None, [*TINY, "data.limit_train=128", "retrain.epochs=1"])
    run = RunDir.create(tmp_path, "two", config_to_dict(short))
    rt.retrain(short, genotype(), run, devices, kvstore="device", log=lambda msg: None)
    longer = load_config(None, [*TINY, "data.limit_train=128"])
    run = RunDir.create(tmp_path, "two", config_to_dict(longer), resume=True)
    result = rt.retrain(longer, genotype(), run, devices, kvstore="device", resume=True, log=lambda msg: None)
    schedule = make_schedule(longer.retrain, 4)
    assert [(r["epoch"], r["iteration"], r["lr"]) for r in run.read_metrics()] == [(1, 4, schedule(4)),
                                                                                  (2, 8, schedule(8))]
    assert result.summary["epochs_done"] == 2


def test_params_rebuild_with_the_recorded_channel_divisor(tmp_path, capsys):
    """Widths 0.75 x (8, 16) are (6, 12) in multiples of 2 but (8, 16) in multiples of 8: eval-only and export
    must rebuild from retrain.json's pair, not from the default divisor."""
    sets = [*TINY, "data.limit_train=64", "retrain.epochs=1", "retrain.channel_divisor=2"]
    cfg = load_config(None, sets)
    run = RunDir.create(tmp_path, "narrow", config_to_dict(cfg))
    result = rt.retrain(cfg, genotype(), run, [mx.cpu()], width_mult=0.75, log=lambda msg: None)
    best = run.path / "best.params"
    assert rt.saved_width(best) == (0.75, 2) == (result.width_mult, result.channel_divisor)
    assert rt.params_width(best, None, load_config(None, TINY).retrain) == (0.75, 2)
    rebuilt = rt.deploy_net(genotype(), *rt.saved_width(best))
    rt.load_params(rebuilt, str(best), [mx.cpu()])
    assert rebuilt.classifier.weight.shape == (10, 12)
    with pytest.raises(GenotypeError, match="at width multiplier 0.75, channel divisor 8 "):
        rt.load_params(rt.deploy_net(genotype(), 0.75), str(best), [mx.cpu()])

    flags = ["--genotype", str(run.path / "genotype.json"), "--params", str(best),
             *[a for kv in TINY for a in ("--set", kv)]]  # the config's divisor is the default 8
    code, out, _ = run_tool("retrain", ["--eval-only", *flags], capsys)
    assert code == 0 and f"test accuracy {result.best_acc:.4f}" in out
    assert "width multiplier 0.75, channel divisor 2" in out
    code, out, _ = run_tool("export_symbol", [*flags, "--out", str(tmp_path / "export" / "model")], capsys)
    assert code == 0 and f"reloaded model test accuracy {result.best_acc:.4f}" in out
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert (meta["width_mult"], meta["channel_divisor"]) == (0.75, 2)


def test_resume_refuses_another_genotype(trained, tmp_path):
    cfg, run, _ = trained
    other = genotype([BlockMask.full(SPEC)])
    resumed = RunDir.create(run.path.parent, run.path.name, config_to_dict(cfg), resume=True)
    with pytest.raises(Exception, match="another genotype"):
        rt.retrain(cfg, other, resumed, [mx.cpu()], resume=True, log=lambda msg: None)


def run_tool(tool, argv, capsys):
    """Run tools/<tool>.py's main through common.run_tool; returns (exit code, stdout, stderr)."""
    import importlib.util

    import common
    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(f"tool_{tool}", REPO_ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        common.run_tool(lambda: module.main(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("tool", ["retrain", "export_symbol"])
def test_tools_exit_2_on_a_bad_genotype(tool, tmp_path, capsys):
    bad = tmp_path / "genotype.json"
    bad.write_text(json.dumps({"version": 1, "skeleton": {}, "space": {}, "shared": True, "masks": []}))
    argv = ["--genotype", str(bad), "--out", str(tmp_path / "x")]
    argv += ["--params", str(tmp_path / "p.params")] if tool == "export_symbol" else []
    code, _, err = run_tool(tool, argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and "genotype.skeleton" in err and "Traceback" not in err


def test_retrain_tool_eval_only_and_impossible_budget(trained, tmp_path, capsys):
    _, run, result = trained
    g = run.path / "genotype.json"
    sets = [a for kv in TINY for a in ("--set", kv)]
    code, out, _ = run_tool("retrain", ["--genotype", str(g), "--eval-only", "--params",
                                        str(run.path / "best.params"), *sets], capsys)
    assert code == 0 and f"test accuracy {result.best_acc:.4f}" in out
    code, _, err = run_tool("retrain", ["--genotype", str(g), "--target-params", "1G", "--out",
                                        str(tmp_path), *sets], capsys)
    assert code == 2 and "out of reach" in err
    assert not (tmp_path / "default-retrain").exists()  # nothing written for an impossible budget
