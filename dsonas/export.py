"""Deployable export of a compiled net: MXNet symbol + params, optionally ONNX, each checked by reloading.

`export()` never leaves a half-written or unchecked model behind: everything is written under a temp
folder beside PREFIX, reloaded and compared with the Gluon net on a random batch, and only then renamed
into place. The net must already be in its deployable form (compiled with aux=False; drop-path and
dropout are inactive at inference because the forward runs outside `autograd.record`).

BatchNorm folding. The written graph has every BatchNorm that follows a convolution folded into it
(dsonas.fold: backend-neutral, so the symbol loads in every MXNet build and converts to ONNX); BN after
a pooling stays. `fuse_bn=True` writes oneDNN's fused graph instead (`optimize_for(x, backend="MKLDNN")`:
`_sg_mkldnn_conv` nodes with Conv+BN+ReLU+sum fused), for MXNet CPU deployment: it loads only in
MKLDNN-enabled CPU builds and `mx.onnx` cannot convert it.

ONNX. `mx.onnx` (needs onnx < 1.16) emits opset-13 nodes but stamps the installed onnx's newest opset,
which runtimes then reject or misread; we re-stamp opset 13 with its matching IR version, and take the
weights out of the graph inputs so runtimes may constant-fold them. The batch dimension is dynamic.
"""

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass

import mxnet as mx
import numpy as np

from .errors import DsonasError
from .fold import folded_block
from .io import atomic_write_bytes, atomic_write_json, new_folder

ONNX_OPSET = 13
INPUT_NAME = "data"


class ExportError(DsonasError):
    """The export cannot be written or does not reproduce the Gluon net."""


@dataclass
class ExportResult:
    symbol_file: str
    params_file: str
    meta_file: str
    onnx_file: str | None
    max_abs_diff: float
    onnx_max_abs_diff: float | None  # None: no ONNX written, or onnxruntime not installed
    params: int
    macs: int  # per image (batch 1)


def onnx_available():
    """Raise ExportError with the fix unless an `mx.onnx`-compatible onnx is installed."""
    try:
        import onnx
    except ImportError:
        raise ExportError("--onnx needs the onnx package, which is not installed: pip install 'onnx<1.16' "
                          "(or pip install -e '.[onnx]')") from None
    major, minor = (int(p) for p in onnx.__version__.split(".")[:2])
    if (major, minor) >= (1, 16):
        raise ExportError(f"mx.onnx in MXNet 1.9.1 needs onnx < 1.16, found {onnx.__version__}: "
                          "pip install 'onnx<1.16'")


def optimize_mkldnn(net, x, **hybridize_flags):
    """`net` as oneDNN's fused graph on inputs shaped like `x`: (SymbolBlock with new Parameters, count
    of BN folded), like dsonas.fold.folded_block.

    BN is folded into the convolutions first (dsonas.fold), then `optimize_for(x, backend="MKLDNN")`
    fuses Conv+ReLU and Conv+sum. Left to oneDNN's own Conv+BN fusion (MXNet 1.9.1), derived nets often
    returned outputs that cannot be read back (asnumpy: "can't generate TBlob for MKLDNN data"); the
    folded graph did so once in 24 (model, size, batch) cases of bench/inference.py, so `export` checks.
    """
    block, count = folded_block(net, INPUT_NAME)
    block.optimize_for(x, backend="MKLDNN", **hybridize_flags)
    return block, count


def export(net, prefix, input_shape, *, meta=None, onnx=False, fuse_bn=False, ctx=None, seed=0, log=print):
    """Write PREFIX-symbol.json, PREFIX-0000.params, PREFIX.json (and PREFIX.onnx), each reload-checked.

    input_shape: (N, C, H, W) of the check batch; MACs in PREFIX.json are per image. `meta`: extra fields
    for PREFIX.json (genotype path, normalization, ...). Returns an ExportResult.
    """
    from .cost import count

    if onnx and fuse_bn:  # refused first: no onnx install can convert the fused graph
        raise ExportError("--onnx cannot convert the oneDNN-fused graph: drop --fuse-bn to export ONNX")
    if onnx:
        onnx_available()
    ctx = ctx or mx.cpu()
    input_shape = tuple(int(d) for d in input_shape)
    x = mx.nd.array(np.random.RandomState(seed).standard_normal(input_shape), ctx=ctx)
    net.hybridize()
    ref = net(x)
    if isinstance(ref, list | tuple):
        raise ExportError(f"the net returns {len(ref)} outputs at inference; compile it with aux=False "
                          "to export")
    ref = ref.asnumpy()
    cost = count(net, (1, *input_shape[1:]), input_name=INPUT_NAME)
    if fuse_bn:
        if not mx.runtime.Features().is_enabled("MKLDNN"):
            raise ExportError("--fuse-bn needs an MKLDNN-enabled MXNet build; export without --fuse-bn")
        model, folded = optimize_mkldnn(net, x)
    else:
        model, folded = folded_block(net, INPUT_NAME)
        model.hybridize()
    advice = "; export without --fuse-bn" if fuse_bn else ""
    _read(model, x, "oneDNN's fused graph" if fuse_bn else "the BN-folded graph", advice)
    log(f"folded {folded} BatchNorm layers into the convolutions before them")

    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(prefix)
    tmp = new_folder(folder, ".tmp-export-")
    try:
        tmp_prefix = os.path.join(tmp, base)
        model.export(tmp_prefix, epoch=0)
        names = {"symbol": f"{base}-symbol.json", "params": f"{base}-0000.params"}
        reloaded = load_exported(os.path.join(tmp, names["symbol"]), os.path.join(tmp, names["params"]), ctx)
        diff = _check(ref, _read(reloaded, x, "the reloaded MXNet symbol", advice), "reloaded MXNet symbol")
        log(f"reload check: max abs diff {diff:.3g} (SymbolBlock.imports vs Gluon net)")
        onnx_diff = None
        if onnx:
            names["onnx"] = f"{base}.onnx"
            onnx_path = os.path.join(tmp, names["onnx"])
            _write_onnx(os.path.join(tmp, names["symbol"]), os.path.join(tmp, names["params"]),
                        input_shape, onnx_path)
            onnx_diff = _check_onnx(onnx_path, x.asnumpy(), ref, log)
        for name in names.values():
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    paths = {k: os.path.join(folder, v) for k, v in names.items()}
    info = {
        "symbol": names["symbol"], "params": names["params"], "onnx": names.get("onnx"),
        "input_name": INPUT_NAME, "input_shape": [1, *input_shape[1:]], "dynamic_batch": True,
        "param_count": cost.params, "macs": cost.macs, "flops": cost.flops,
        "bn_folded": folded, "bn_fused": bool(fuse_bn), "onnx_opset": ONNX_OPSET if onnx else None,
        "max_abs_diff": diff, "onnx_max_abs_diff": onnx_diff,
        "sizes_bytes": {k: os.path.getsize(p) for k, p in paths.items()},
        **(meta or {}),
    }
    meta_file = os.path.join(folder, f"{base}.json")
    atomic_write_json(meta_file, info)
    return ExportResult(paths["symbol"], paths["params"], meta_file, paths.get("onnx"), diff, onnx_diff,
                        cost.params, cost.macs)


def add_meta(meta_file, **fields):
    """Add fields (e.g. the reloaded model's test accuracy) to PREFIX.json, atomically."""
    with open(meta_file, encoding="utf-8") as f:
        info = json.load(f)
    info.update(fields)
    atomic_write_json(meta_file, info)


def load_exported(symbol_file, params_file, ctx=None):
    """The exported model as a Gluon SymbolBlock, as a deployment would load it."""
    with warnings.catch_warnings():
        # imports() warns that it cannot infer the input's dtype before the first call: expected, float32.
        warnings.filterwarnings("ignore", message=".*Cannot decide type for the following arguments")
        return mx.gluon.SymbolBlock.imports(str(symbol_file), [INPUT_NAME], str(params_file),
                                            ctx=ctx or mx.cpu())


def _read(net, x, what, advice=""):
    """net(x) as a numpy array; MXNet failing to read it back is an ExportError ending in `advice` (seen
    with oneDNN's fused graph in MXNet 1.9.1: "can't generate TBlob for MKLDNN data")."""
    try:
        return net(x).asnumpy()
    except mx.base.MXNetError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ExportError(f"{what} returns outputs MXNet cannot read back ({reason}); nothing was written"
                          f"{advice}") from None


def _check(ref, out, what):
    """Max abs difference of `out` from `ref`; beyond float32 noise (relative to the logits) is an error."""
    if out.shape != ref.shape:
        raise ExportError(f"{what} gives shape {out.shape}, the Gluon net {ref.shape}")
    diff = float(np.abs(out - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        raise ExportError(f"{what} differs from the Gluon net by {diff:.3g} (> {tol:.3g}); nothing was "
                          "written: report this with the genotype")
    return diff


def _write_onnx(symbol_file, params_file, input_shape, path):
    import onnx

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # mx.onnx narrates every step at INFO on the root logger
    try:
        mx.onnx.export_model(symbol_file, params_file, [input_shape], [np.float32], path,
                             dynamic=True, dynamic_input_shapes=[(None, *input_shape[1:])])
    finally:
        root.setLevel(level)
    model = onnx.load(path)
    opset = onnx.helper.make_opsetid("", ONNX_OPSET)
    del model.opset_import[:]
    model.opset_import.append(opset)
    model.ir_version = onnx.helper.find_min_ir_version_for([opset])
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.checker.check_model(model, full_check=True)
    atomic_write_bytes(path, model.SerializeToString())


def _check_onnx(path, x, ref, log):
    try:
        import onnxruntime
    except ImportError:
        log("onnxruntime is not installed: the ONNX file was checked by onnx.checker only "
            "(pip install onnxruntime to compare its outputs)")
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    diff = _check(ref, out, "ONNX model under onnxruntime")
    log(f"onnx check: max abs diff {diff:.3g} (onnxruntime {onnxruntime.__version__} vs Gluon net)")
    return diff
