"""The search pipeline end to end on a tiny config: pretrain -> search -> derive, resume, divergence."""

import math

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from dsonas import checkpoint, engine, loop
from dsonas.config import config_to_dict, load_config
from dsonas.errors import RunFolderError, TrainingError
from dsonas.genotype import Genotype
from dsonas.network import compile_genotype
from dsonas.report import build_report
from dsonas.runs import RunDir

# 120 digits (60 W + 60 λ, 3 batches each), 16x16 inputs, two 3-level blocks of 8 filters. Ratio 1:3 and a
# large γ and λ rate so that the first search epoch (3 W + 9 λ steps) already cuts edges (the graph
# shrinks) and the second prunes ops without emptying the block (measured: sparsity 0.03, then 0.88).
TINY = ["data.limit_train=120", "data.batch_size=16", "data.input_size=16", "skeleton.filters=8",
        "skeleton.stages=[1,1]", "space.levels=3", "pretrain.epochs=1", "search.epochs=2",
        "search.gamma=0.05", "search.lambda_lr=0.4", "search.ratio=[1,3]"]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def new_run(tmp_path, name, cfg, resume=False):
    return RunDir.create(tmp_path, name, config_to_dict(cfg), resume=resume)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run: its result and folder."""
    cfg = tiny_cfg()
    run = new_run(tmp_path_factory.mktemp("straight"), "run", cfg)
    return engine.run_search(cfg, run), run


def test_pipeline_prunes_and_writes_a_loadable_genotype(straight):
    result, run = straight
    assert result.summary["sparsity"] > 0
    genotype = Genotype.load(run.path / "genotype.json")
    assert genotype.masks == result.genotype.masks
    assert genotype.shared and len(genotype.masks) == 1
    assert genotype.lambdas is not None
    # Every edge the genotype keeps has a non-zero λ; every λ outside it is exactly zero.
    lam = genotype.lambdas[0]
    mask = genotype.masks[0]
    assert all(lam["out"][o] != 0 for o in mask.outputs)
    assert all(lam["out"][o] == 0 for o in range(genotype.spec.num_op_slots) if o not in mask.outputs)
    net = compile_genotype(genotype)
    net.initialize()
    assert net(mx.nd.zeros((2, 3, 16, 16))).shape == (2, 10)
    assert result.summary["derived_params"] > 0


def test_metrics_and_checkpoints_per_epoch(straight):
    _, run = straight
    records = run.read_metrics()
    assert [(r["stage"], r["epoch"]) for r in records] == [("pretrain", 1), ("search", 1), ("search", 2)]
    for r in records:
        for key in ("w_loss", "w_acc", "lam_loss", "lam_acc", "sparsity", "derived_params", "derived_macs",
                    "epoch_time"):
            assert math.isfinite(r[key]), key
        assert len(r["live_ops"]) == len(r["block_macs"]) == 2
        assert len(r["lambdas"]) == 1 and set(r["lambdas"][0]) == {"in2", "in3", "out"}  # one shared λ set
    assert records[0]["sparsity"] == 0  # λ is not trained during pretrain
    # Pruned (and shrunk) after the first search epoch already, more after the second, never everything.
    assert 0 < records[1]["sparsity"] < records[2]["sparsity"] < 1
    assert 0 < sum(records[2]["live_ops"]) < sum(records[1]["live_ops"])
    assert checkpoint.read_meta(run.checkpoint_path("pretrain"))["epoch"] == 1
    meta = checkpoint.read_meta(run.checkpoint_path("search"))
    assert meta["epoch"] == 2 and meta["iteration"] == 24 and len(meta["masks"]) == 2
    assert "search epoch 2/2" in (run.path / "log.txt").read_text()


def test_report_reads_a_real_search_run(straight):
    _, run = straight
    files = build_report(run)
    for name in ("lambda.png", "sparsity.png", "accuracy.png", "genotype.png", "report.md"):
        assert name in files, name
    assert "λ trajectories" in (run.path / "report" / "report.md").read_text()


def test_resume_after_interrupted_search_matches_uninterrupted(straight, tmp_path, monkeypatch):
    expected, _ = straight
    cfg = tiny_cfg()
    real_reseed = engine.reseed

    def die_in_second_search_epoch(seed, stage, epoch):
        if (stage, epoch) == ("search", 1):
            raise KeyboardInterrupt  # killed after the first search epoch was checkpointed
        real_reseed(seed, stage, epoch)

    monkeypatch.setattr(engine, "reseed", die_in_second_search_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.run_search(cfg, new_run(tmp_path, "run", cfg))
    monkeypatch.setattr(engine, "reseed", real_reseed)
    resumed = engine.run_search(cfg, new_run(tmp_path, "run", cfg, resume=True), resume=True)

    assert resumed.genotype.masks == expected.genotype.masks
    for got, want in zip(resumed.genotype.lambdas, expected.genotype.lambdas, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    stages = [(r["stage"], r["epoch"]) for r in RunDir(tmp_path / "run").read_metrics()]
    assert stages == [("pretrain", 1), ("search", 1), ("search", 2)]  # nothing re-run


def test_extending_a_finished_search_continues_from_its_last_epoch(tmp_path):
    short = tiny_cfg("search.epochs=1")
    engine.run_search(short, new_run(tmp_path, "run", short))
    longer = tiny_cfg("search.epochs=2")
    engine.run_search(longer, new_run(tmp_path, "run", longer, resume=True), resume=True)
    stages = [(r["stage"], r["epoch"]) for r in RunDir(tmp_path / "run").read_metrics()]
    assert stages == [("pretrain", 1), ("search", 1), ("search", 2)]


def test_nan_loss_raises_and_keeps_the_previous_checkpoint(tmp_path):
    cfg = tiny_cfg()
    run = new_run(tmp_path, "run", cfg)
    s = engine.prepare(cfg, [mx.cpu()], "device", log=run.log)
    engine.pretrain(s, run)
    before = run.checkpoint_path("pretrain").read_bytes()
    ce = gluon.loss.SoftmaxCrossEntropyLoss()
    s.loss_fn = lambda out, y: ce(out, y) * float("nan")
    with pytest.raises(TrainingError, match="lower the learning rate"):
        engine.search(s, run)
    assert not run.checkpoint_path("search").exists()
    assert run.checkpoint_path("pretrain").read_bytes() == before


def test_checkpoint_from_another_network_is_refused(tmp_path):
    cfg = tiny_cfg()
    run = new_run(tmp_path, "run", cfg)
    s = engine.prepare(cfg, [mx.cpu()], "device", log=run.log)
    trainer = loop.make_trainer(s.net.weight_params(), "nag", {"learning_rate": 0.1}, "device")
    checkpoint.save_checkpoint(run.checkpoint_path("pretrain"), s.params, {"w": trainer}, {"epoch": 1})
    other = engine.prepare(tiny_cfg("skeleton.filters=16"), [mx.cpu()], "device", log=run.log)
    with pytest.raises(RunFolderError, match="does not match the network|has shape"):
        checkpoint.load_checkpoint(run.checkpoint_path("pretrain"), other.params, {"w": trainer})


def test_search_plan_interleaves_w_and_lambda_steps():
    assert engine.search_plan(3, [1, 1]) == ["w", "lam"] * 3
    assert engine.search_plan(5, [4, 1]) == ["w"] * 4 + ["lam"] + ["w", "lam"]
    assert engine.search_plan(2, [1, 2]) == ["w", "lam", "lam"] * 2


def test_reseed_makes_epochs_reproducible():
    checkpoint.reseed(3, "search", 5)
    a = (np.random.rand(), mx.nd.random.uniform(shape=(2,)).asnumpy())
    checkpoint.reseed(3, "search", 5)
    b = (np.random.rand(), mx.nd.random.uniform(shape=(2,)).asnumpy())
    checkpoint.reseed(3, "search", 6)
    c = np.random.rand()
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and c != a[0]


@pytest.mark.parametrize("kind", ["flops", "mac"])
def test_budget_penalties_hand_per_lambda_gamma_to_apg_nag(kind, tmp_path):
    cfg = tiny_cfg(f"search.penalty={kind}", "search.epochs=1", "search.ratio=[1,1]")
    s = engine.prepare(cfg, [mx.cpu()], "device", log=lambda msg: None)
    trainer = engine._lam_trainer(s)
    masks = s.net.masks
    engine._apply_gamma(s, engine._penalty(s), masks, trainer)
    gammas = [engine.trainer_optimizer(trainer).gamma_of(i) for i in range(len(s.net.lambda_params()))]
    values = np.concatenate([np.ravel(g) for g in gammas])
    assert all(isinstance(g, np.ndarray) for g in gammas)
    assert (values > 0).all() and (values <= cfg.search.gamma + 1e-9).all()
    if kind == "mac":  # Eq. 10: per-op costs differ, so do the γ
        assert values.min() < values.max()
    engine.search(s, new_run(tmp_path, "run", cfg))  # and the search runs with them


def test_recalibrate_bn_sets_the_mean_of_the_batch_statistics():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=2), gluon.nn.BatchNorm(scale=False, in_channels=4))
    net.initialize(mx.init.Xavier())
    bn = net[1]
    bn._kwargs["momentum"] = 0.0
    for p in net.collect_params().values():
        p.grad_req = "null"
    net.hybridize(static_alloc=True)
    rng = np.random.RandomState(0)
    batches = [(mx.nd.array(rng.normal(shift, 1 + shift, (8, 2, 5, 5))), mx.nd.zeros(8)) for shift in (0, 3)]
    conv_out = [net[0](x).asnumpy() for x, _ in batches]
    engine.recalibrate_bn(net, batches, [mx.cpu()], batches=2)
    expected_mean = np.mean([c.mean(axis=(0, 2, 3)) for c in conv_out], axis=0)
    assert np.allclose(bn.running_mean.data().asnumpy(), expected_mean, rtol=1e-4, atol=1e-5)
    expected_var = np.mean([c.var(axis=(0, 2, 3)) for c in conv_out], axis=0)
    assert np.allclose(bn.running_var.data().asnumpy(), expected_var, rtol=0.05)
    # inference now normalises with those statistics: the second batch's output is centred per channel
    out = net(batches[1][0]).asnumpy()
    assert not np.allclose(out.mean(axis=(0, 2, 3)), 0, atol=0.1)  # averaged stats, not the last batch's


@pytest.mark.parametrize("recompute", [False, True])
def test_recalibrated_twin_in_inference_equals_the_supernet_on_batch_statistics(recompute):
    """After recalibrating on one batch, the twin's inference output on that batch is the training-mode
    output (batch statistics) of the supernet. Fails with a static_shape twin (max diff 19 measured).
    With recompute the twin recalibrates one segment at a time (dsonas.recompute.bn_statistics_pass)."""
    cfg = tiny_cfg(f"runtime.recompute={str(recompute).lower()}")
    s = engine.prepare(cfg, [mx.cpu()], "device", log=lambda msg: None)
    x, y = next(iter(s.loaders.test))
    engine.evaluate_twin(s, [(x, y)])  # builds the twin and copies the weights in
    engine.recalibrate_bn(s.twin, [(x, y)], s.ctx, batches=1)
    with mx.autograd.train_mode():
        reference = s.net(x).asnumpy()
    assert np.abs(s.twin(x).asnumpy() - reference).max() < 1e-3


def test_recompute_search_matches_the_stored_activation_search(straight, tmp_path):
    """runtime.recompute changes memory and time, not the maths: on this short search the same genotype and
    λ to 1e-4 (over long searches float rounding differences grow, as with any change of summation order)."""
    cfg = tiny_cfg("runtime.recompute=true")
    result = engine.run_search(cfg, new_run(tmp_path, "recompute", cfg))
    reference, _ = straight
    assert result.genotype.masks == reference.genotype.masks
    for lam, ref in zip(result.genotype.lambdas, reference.genotype.lambdas, strict=True):
        for key in ref:
            np.testing.assert_allclose(lam[key], ref[key], rtol=0, atol=1e-4, err_msg=key)
    assert result.summary["supernet_test_acc"] == pytest.approx(reference.summary["supernet_test_acc"])
