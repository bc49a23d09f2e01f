"""Export -> reload gives the Gluon net's outputs (MXNet symbol and ONNX), for both skeletons; failures
leave nothing behind; the export tool scores the reloaded model."""

import importlib.util
import json
import sys

import mxnet as mx
import numpy as np
import pytest

from dsonas import cost
from dsonas import export as ex
from dsonas.genotype import BlockMask, Genotype
from dsonas.network import compile_genotype
from dsonas.space import BlockSpec, Skeleton

SPEC = BlockSpec(levels=2, ops=("sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3"))
MASK = BlockMask(inputs=((0,), (), (0,), (0,), (0, 1, 4), (0, 3), (), ()), outputs=(2, 4, 5))
SKELETONS = {
    "cifar": Skeleton("cifar", 8, (1, 1, 1), 10, 16),
    "imagenet": Skeleton("imagenet", 8, (1, 1, 1, 1), 10, 64),  # stride-4 stem: 64 px reaches 2x2
}
HAS_ONNX = importlib.util.find_spec("onnx") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def genotype(kind="cifar"):
    return Genotype(SKELETONS[kind], SPEC, True, [MASK])


def trained_like(net, seed=0, x=None):
    """Initialize and give BatchNorm non-trivial statistics, so a graph that mishandled BN would show.
    x: a batch to finish deferred initialisation with first (GluonCV models infer their shapes)."""
    net.initialize(mx.init.Xavier(magnitude=2))
    if x is not None:
        net(x)
    rng = np.random.RandomState(seed)
    for name, param in net.collect_params().items():
        if name.endswith(("running_mean", "beta")):
            param.set_data(mx.nd.array(rng.uniform(-0.5, 0.5, param.shape)))
        elif name.endswith(("running_var", "gamma")):
            param.set_data(mx.nd.array(rng.uniform(0.5, 1.5, param.shape)))
    return net


def shape_of(kind, batch=2):
    size = SKELETONS[kind].input_size
    return (batch, 3, size, size)


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_export_reload_gives_the_same_outputs(kind, tmp_path):
    net = trained_like(compile_genotype(genotype(kind)))
    res = ex.export(net, tmp_path / "m", shape_of(kind), meta={"genotype": "g.json"}, log=lambda m: None)
    assert res.max_abs_diff <= 1e-4
    # Independently of export's own check: another batch size, another batch.
    x = mx.nd.array(np.random.RandomState(1).standard_normal(shape_of(kind, batch=5)))
    reloaded = ex.load_exported(res.symbol_file, res.params_file)
    np.testing.assert_allclose(reloaded(x).asnumpy(), net(x).asnumpy(), rtol=1e-4, atol=1e-5)
    info = json.loads((tmp_path / "m.json").read_text())
    report = cost.count(net, (1, *shape_of(kind)[1:]))
    assert info["param_count"] == report.params == res.params and info["macs"] == report.macs
    assert info["input_shape"] == [1, *shape_of(kind)[1:]] and info["genotype"] == "g.json"
    assert info["sizes_bytes"]["params"] == (tmp_path / "m-0000.params").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # Written with BN folded into the convolutions before it (BN after a pooling stays).
    nodes = json.loads((tmp_path / "m-symbol.json").read_text())["nodes"]
    bn_inputs = [nodes[n["inputs"][0][0]]["op"] for n in nodes if n["op"] == "BatchNorm"]
    assert bn_inputs and set(bn_inputs) <= {"Pooling"} and info["bn_folded"] > 0 and not info["bn_fused"]


@pytest.mark.skipif(not HAS_ONNX, reason="onnx is not installed (pip install 'onnx<1.16')")
@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_onnx_is_opset_13_with_a_dynamic_batch_and_matches(kind, tmp_path):
    import onnx

    net = trained_like(compile_genotype(genotype(kind)))
    res = ex.export(net, tmp_path / "m", shape_of(kind), onnx=True, log=lambda m: None)
    model = onnx.load(res.onnx_file)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    assert [i.name for i in model.graph.input] == ["data"]  # weights are initializers, not inputs
    if not HAS_ORT:
        assert res.onnx_max_abs_diff is None
        return
    import onnxruntime

    assert res.onnx_max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(res.onnx_file, providers=["CPUExecutionProvider"])
    x = np.random.RandomState(2).standard_normal(shape_of(kind, batch=3)).astype(np.float32)
    out = session.run(None, {"data": x})[0]
    np.testing.assert_allclose(out, net(mx.nd.array(x)).asnumpy(), rtol=1e-3, atol=1e-4)


def test_onnx_requested_without_onnx_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    net = trained_like(compile_genotype(genotype()))
    with pytest.raises(ex.ExportError, match=r"pip install 'onnx<1.16'"):
        ex.export(net, tmp_path / "m", shape_of("cifar"), onnx=True)
    assert not list(tmp_path.iterdir())


def test_a_mismatching_reload_is_an_error_and_nothing_lands(tmp_path, monkeypatch):
    net = trained_like(compile_genotype(genotype()))
    real = ex.load_exported

    def corrupted(*args, **kwargs):
        block = real(*args, **kwargs)
        return lambda x: block(x) + 1e-2

    monkeypatch.setattr(ex, "load_exported", corrupted)
    with pytest.raises(ex.ExportError, match="differs from the Gluon net by 0.01"):
        ex.export(net, tmp_path / "m", shape_of("cifar"), log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_aux_head_is_refused(tmp_path):
    net = trained_like(compile_genotype(genotype(), aux=True))
    with pytest.raises(ex.ExportError, match="aux=False"):
        ex.export(net, tmp_path / "m", shape_of("cifar"))


@pytest.mark.skipif(not mx.runtime.Features().is_enabled("MKLDNN"), reason="MXNet built without oneDNN")
def test_fuse_bn_writes_onednns_fused_graph(tmp_path):
    net = trained_like(compile_genotype(genotype()))
    res = ex.export(net, tmp_path / "m", shape_of("cifar"), fuse_bn=True, log=lambda m: None)
    nodes = json.loads((tmp_path / "m-symbol.json").read_text())["nodes"]
    assert any(n["op"] == "_sg_mkldnn_conv" for n in nodes)
    # BN after a pooling op stays (nothing to fold it into); no BN is left after a convolution.
    bn_inputs = [nodes[n["inputs"][0][0]]["op"] for n in nodes if n["op"] == "BatchNorm"]
    assert bn_inputs and set(bn_inputs) <= {"Pooling"}
    assert res.max_abs_diff <= 1e-4
    with pytest.raises(ex.ExportError, match="drop --fuse-bn"):
        ex.export(net, tmp_path / "n", shape_of("cifar"), fuse_bn=True, onnx=True)


def test_unreadable_fused_outputs_are_an_error_and_nothing_lands(tmp_path, monkeypatch):
    class Unreadable:
        def asnumpy(self):
            raise mx.base.MXNetError("Check failed: !IsMKLDNNData(): We can't generate TBlob for MKLDNN data")

    monkeypatch.setattr(ex, "optimize_mkldnn", lambda net, x: (lambda data: Unreadable(), 0))
    net = trained_like(compile_genotype(genotype()))
    with pytest.raises(ex.ExportError, match="cannot read back .*TBlob.*; export without --fuse-bn"):
        ex.export(net, tmp_path / "m", shape_of("cifar"), fuse_bn=True, log=lambda m: None)
    assert not list(tmp_path.iterdir())


def test_export_tool_prints_the_reloaded_models_test_accuracy(tmp_path, capsys):
    from test_retrain import run_tool

    g = genotype()
    g.save(tmp_path / "genotype.json")
    net = trained_like(compile_genotype(g))
    net.save_parameters(str(tmp_path / "best.params"))
    argv = ["--genotype", str(tmp_path / "genotype.json"), "--params", str(tmp_path / "best.params"),
            "--out", str(tmp_path / "export" / "model"), "--set", "data.input_size=16"]
    code, out, err = run_tool("export_symbol", argv, capsys)
    assert code == 0, err
    assert "reloaded model test accuracy" in out and (tmp_path / "export" / "model-symbol.json").is_file()
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert 0.0 <= info["test_acc"] <= 1.0 and info["width_mult"] == 1.0 and len(info["mean"]) == 3
    code, _, err = run_tool("export_symbol", [*argv, "--width-mult", "2"], capsys)
    assert code == 2 and "does not fit this genotype at width multiplier 2" in err
