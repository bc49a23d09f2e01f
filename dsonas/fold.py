"""BatchNorm folded into the convolution before it, on the symbol graph: a smaller inference net.

At inference BN is a per-channel affine map, so Conv -> BN is one convolution with weight W * s and bias
β + (b - μ) * s, where s = γ / sqrt(σ² + eps) (γ = 1 when BN was built with scale=False). MXNet 1.9.1
only folds inside its oneDNN backend (`optimize_for(backend="MKLDNN")`), whose graph loads in MKLDNN CPU
builds only and does not convert to ONNX; folding the graph itself works for every backend and for ONNX,
and removes one operator per pair: a derived net's batch-1 latency follows its operator count
(bench/README.md). A BN whose convolution output is read elsewhere too, a BN on another op (a pooling),
or one whose batch statistics are read, stays as it is.
"""

import json
import warnings
from collections import Counter

import mxnet as mx
import numpy as np

BN_DEFAULTS = {"eps": 1e-3, "fix_gamma": True, "axis": 1}  # MXNet's BatchNorm defaults, for absent attrs


def _flag(value):
    return str(value).lower() in ("true", "1")


def _attr(node, key):
    value = node.get("attrs", {}).get(key, BN_DEFAULTS[key])
    return _flag(value) if isinstance(BN_DEFAULTS[key], bool) else type(BN_DEFAULTS[key])(value)


def _foldable(nodes, heads):
    """{BN node id: conv node id} for every Conv -> BN pair that can be folded."""
    readers = Counter((i, k) for node in nodes for i, k, _ in node["inputs"])
    readers.update((i, k) for i, k, _ in heads)
    pairs = {}
    for b, bn in enumerate(nodes):
        if bn["op"] != "BatchNorm" or _attr(bn, "axis") != 1 or readers[(b, 1)] or readers[(b, 2)]:
            continue
        c, k, _ = bn["inputs"][0]
        conv_params = [i for i, _, _ in nodes[c]["inputs"][1:]]  # weight (and bias): not shared
        if (nodes[c]["op"] == "Convolution" and k == 0 and readers[(c, 0)] == 1
                and all(readers[(i, 0)] == 1 for i in conv_params)):
            pairs[b] = c
    return pairs


def _fold_values(nodes, bn, conv, params, bias_name):
    """New weight and bias of `conv` absorbing `bn`, written into `params`."""
    name = [nodes[i]["name"] for i, _, _ in bn["inputs"]]  # data, gamma, beta, moving_mean, moving_var
    gamma, beta, mean, var = (params[n].asnumpy().astype(np.float64) for n in name[1:])
    if _attr(bn, "fix_gamma"):
        gamma = np.ones_like(gamma)
    scale = gamma / np.sqrt(var + _attr(bn, "eps"))
    weight_name = nodes[conv["inputs"][1][0]]["name"]
    weight = params[weight_name]
    w = weight.asnumpy().astype(np.float64)
    old_bias = params[bias_name].asnumpy().astype(np.float64) if bias_name in params else 0.0
    params[weight_name] = mx.nd.array(w * scale.reshape(-1, *[1] * (w.ndim - 1)), ctx=weight.context)
    params[bias_name] = mx.nd.array(beta + (old_bias - mean) * scale, ctx=weight.context)


def _pruned(nodes, heads):
    """Nodes reachable from the heads, renumbered in their (topological) order."""
    keep, stack = set(), [i for i, _, _ in heads]
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(j for j, _, _ in nodes[i]["inputs"])
    new_id = {old: new for new, old in enumerate(sorted(keep))}
    out = [dict(nodes[old], inputs=[[new_id[i], k, v] for i, k, v in nodes[old]["inputs"]])
           for old in sorted(keep)]
    return out, [[new_id[i], k, v] for i, k, v in heads]


def fold_batchnorm(symbol, params):
    """Fold every foldable Conv -> BN pair of `symbol`.

    params: {name: NDArray} of the symbol's arguments and auxiliary states (names as in the symbol).
    Returns (symbol, params, count): the folded graph, its parameters (BN's gone, conv biases added or
    updated) and the number of BN nodes folded. The inputs are not modified.
    """
    graph = json.loads(symbol.tojson())
    nodes, heads = graph["nodes"], graph["heads"]
    pairs = _foldable(nodes, heads)
    params = dict(params)
    names = {node["name"] for node in nodes}
    out, new_id = [], {}
    bn_of = {c: b for b, c in pairs.items()}
    for i, node in enumerate(nodes):
        if i in pairs:  # the BN: readers of its output read the convolution's
            new_id[i] = new_id[pairs[i]]
            continue
        node = dict(node, inputs=[[new_id[j], k, v] for j, k, v in node["inputs"]])
        if i in bn_of:
            attrs = dict(node.get("attrs", {}))
            if _flag(attrs.get("no_bias", False)):
                bias_name = f"{node['name']}_bias"
                while bias_name in names:
                    bias_name += "_"
                names.add(bias_name)
                out.append({"op": "null", "name": bias_name, "inputs": []})
                node["inputs"].append([len(out) - 1, 0, 0])
                attrs["no_bias"] = "False"
            else:
                bias_name = out[node["inputs"][2][0]]["name"]
            node["attrs"] = attrs
            _fold_values(nodes, nodes[bn_of[i]], nodes[i], params, bias_name)
        new_id[i] = len(out)
        out.append(node)
    heads = [[new_id[i], k, v] for i, k, v in heads]
    out, heads = _pruned(out, heads)
    graph = {"nodes": out, "arg_nodes": [i for i, n in enumerate(out) if n["op"] == "null"], "heads": heads,
             "attrs": graph.get("attrs", {})}
    folded = mx.sym.load_json(json.dumps(graph))
    used = set(folded.list_arguments()) | set(folded.list_auxiliary_states())
    return folded, {k: v for k, v in params.items() if k in used}, len(pairs)


def folded_block(net, input_name="data"):
    """`net` (an initialised HybridBlock with one input and one output) as a SymbolBlock with its
    Conv -> BN pairs folded. Returns (block, count of BN folded); the block's Parameters hold copies.

    Reading the weights back runs oneDNN reorders in the calling thread: call
    dsonas.openmp.serial_main_thread() first in a long-lived process (the tools do).
    """
    data = mx.sym.var(input_name)
    out = net(data)
    if isinstance(out, list | tuple):
        raise ValueError(f"the net returns {len(out)} outputs; fold a single-output (inference) net")
    params = {p.name: p.data() for p in net.collect_params().values()}
    symbol, params, count = fold_batchnorm(out, params)
    with warnings.catch_warnings():  # it cannot infer the input's dtype before the first call: float32
        warnings.filterwarnings("ignore", message=".*Cannot decide type for the following arguments")
        block = mx.gluon.SymbolBlock(symbol, data)
    if params:  # (an identity op has none)
        block.collect_params().load_dict(params, ctx=next(iter(params.values())).context)
    return block, count
