"""Block masks, deriving them from λ, and the genotype file that hands an architecture from search to retrain.

A mask is a sub-graph of the fully connected block (DESIGN.md §2): ``inputs[o]`` lists the nodes feeding
op slot ``o`` (empty = the op is gone) and ``outputs`` the op slots merged into the block output. Valid
masks are closed: every live op reads only live nodes of earlier levels and reaches the output.
"""

import json
from dataclasses import dataclass

import numpy as np

from dsonas.errors import ConfigError, GenotypeError
from dsonas.io import atomic_write_json
from dsonas.space import BYPASSES, BlockSpec, Skeleton

GENOTYPE_VERSION = 1


@dataclass(frozen=True)
class BlockMask:
    """inputs: one sorted tuple of nodes per op slot (empty = dead op); outputs: sorted op slots merged."""

    inputs: tuple
    outputs: tuple

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(tuple(sorted(nodes)) for nodes in self.inputs))
        object.__setattr__(self, "outputs", tuple(sorted(self.outputs)))

    @classmethod
    def full(cls, spec):
        """The fully connected block: the supernet."""
        slots = range(spec.num_op_slots)
        return cls(inputs=tuple(spec.candidate_inputs(o) for o in slots), outputs=tuple(slots))

    def live_slots(self):
        return tuple(o for o, nodes in enumerate(self.inputs) if nodes)

    @property
    def is_identity(self):
        """Nothing is live: the block computes its input unchanged."""
        return not self.live_slots()

    def num_edges(self):
        """Input edges plus output edges."""
        return sum(len(nodes) for nodes in self.inputs) + len(self.outputs)

    def to_dict(self):
        return {"inputs": [list(nodes) for nodes in self.inputs], "outputs": list(self.outputs)}


def check_mask(spec, mask, where="mask"):
    """Raise GenotypeError (naming `where`.field) unless `mask` is a valid, closed mask of `spec`."""
    n_slots = spec.num_op_slots
    if len(mask.inputs) != n_slots:
        raise GenotypeError(f"{where}.inputs: expected {n_slots} entries (one per op slot of "
                            f"{spec.levels} levels x {spec.n_ops} ops), got {len(mask.inputs)}")
    for o, nodes in enumerate(mask.inputs):
        field = f"{where}.inputs[{o}]"
        if len(set(nodes)) != len(nodes):
            raise GenotypeError(f"{field}: a node is listed twice in {list(nodes)}; list each input once")
        for node in nodes:
            if not 0 <= node <= n_slots:
                raise GenotypeError(f"{field}: node {node} out of range 0..{n_slots}")
            if node > o:
                raise GenotypeError(f"{field}: node {node} is not earlier than op slot {o}")
            if node not in spec.candidate_inputs(o):
                raise GenotypeError(f"{field}: node {node} (op slot {node - 1}) is in the same level "
                                    f"{spec.level_of(o)} as op slot {o}; inputs come from earlier levels")
            if node > 0 and not mask.inputs[node - 1]:
                raise GenotypeError(f"{field}: node {node} is the output of op slot {node - 1}, which has "
                                    f"no inputs; drop the edge or give op slot {node - 1} an input")
    if len(set(mask.outputs)) != len(mask.outputs):
        raise GenotypeError(f"{where}.outputs: an op slot is listed twice in {list(mask.outputs)}")
    for slot in mask.outputs:
        if not 0 <= slot < n_slots:
            raise GenotypeError(f"{where}.outputs: op slot {slot} out of range 0..{n_slots - 1}")
        if not mask.inputs[slot]:
            raise GenotypeError(f"{where}.outputs: op slot {slot} has no inputs; drop it from outputs")
    reaching = _reaching_output(mask.inputs, mask.outputs)
    for o in mask.live_slots():
        if o not in reaching:
            raise GenotypeError(f"{where}.inputs[{o}]: op slot {o} has inputs but reaches no output; "
                                f"add it to outputs, feed it to a later op, or empty its inputs")


def _reaching_output(inputs, outputs):
    """Op slots with a path to the block output (walking the levels backwards)."""
    reaching = set(outputs)
    for o in reversed(range(len(inputs))):
        if o in reaching:
            reaching.update(node - 1 for node in inputs[o] if node > 0)
    return reaching


def derive_mask(spec, lambdas, max_inputs_per_op=None, prev_mask=None):
    """The mask left once every edge with λ == 0 is dropped (pure function of its arguments).

    lambdas: {"in2": ..., "out": ...} shaped as spec.lambda_shapes(). Edges absent from `prev_mask` stay
    absent. `max_inputs_per_op` keeps, per op, the k largest |λ| among its live inputs (ties: earlier
    node). One forward pass in level order (an op lives if a live node feeds it) and one backward pass
    (an op lives if it reaches the output) reach the fixpoint, because an op dropped by the backward
    pass feeds no surviving op. An empty result is the identity block.
    """
    shapes = spec.lambda_shapes()
    arrays = {}
    for key, shape in shapes.items():
        if key not in lambdas or np.shape(lambdas[key]) != shape:
            got = np.shape(lambdas[key]) if key in lambdas else "missing"
            raise ValueError(f"lambda {key!r}: expected shape {shape}, got {got}")
        arrays[key] = np.abs(np.asarray(lambdas[key], dtype=np.float64))
    prev = prev_mask if prev_mask is not None else BlockMask.full(spec)

    inputs = []
    for o in range(spec.num_op_slots):
        level = spec.level_of(o)
        alive = [k for k in prev.inputs[o] if k == 0 or inputs[k - 1]]
        if level > 1:
            row = arrays[f"in{level}"][o - (level - 1) * spec.n_ops]
            alive = [k for k in alive if row[k] != 0]
            if max_inputs_per_op is not None:
                alive = sorted(sorted(alive, key=lambda k: (-row[k], k))[:max_inputs_per_op])
        inputs.append(tuple(alive))
    outputs = tuple(o for o in prev.outputs if arrays["out"][o] != 0 and inputs[o])
    reaching = _reaching_output(inputs, outputs)
    inputs = tuple(nodes if o in reaching else () for o, nodes in enumerate(inputs))
    return BlockMask(inputs=inputs, outputs=outputs)


@dataclass
class Genotype:
    """A searched architecture: skeleton, block spec and one mask per block (or one shared by all).

    bypass / cell_bn: how a shuffle skeleton's units are built (DsoNet's arguments of the same names), so
    retrain and export compile the net that was searched; None = the defaults, as files without them get.
    """

    skeleton: Skeleton
    spec: BlockSpec
    shared: bool
    masks: list
    lambdas: list = None  # optional, one dict key -> np.ndarray per mask, for reports
    bypass: str = None
    cell_bn: bool = None
    version: int = GENOTYPE_VERSION

    @property
    def num_blocks(self):
        return self.skeleton.num_blocks

    def mask_for_block(self, block):
        return self.masks[0] if self.shared else self.masks[block]

    def block_masks(self):
        """One mask per block of the skeleton (a shared mask repeated), as DsoNet takes them."""
        return [self.mask_for_block(b) for b in range(self.num_blocks)]

    @classmethod
    def from_network(cls, net, max_inputs_per_op=None):
        """Derive the genotype from a searched DsoNet's current λ, keeping its current masks' prunings."""
        lambdas = net.lambdas_numpy()
        masks = net.masks
        if net.shared:
            lambdas, masks = lambdas[:1], masks[:1]
        derived = [derive_mask(net.spec, lam, max_inputs_per_op, prev_mask=mask)
                   for lam, mask in zip(lambdas, masks, strict=True)]
        return cls(skeleton=net.skeleton, spec=net.spec, shared=net.shared, masks=derived, lambdas=lambdas,
                   bypass=net.bypass, cell_bn=net.cell_bn)

    def to_dict(self):
        return {
            "version": self.version,
            "skeleton": self.skeleton.to_dict(),
            "space": self.spec.to_dict(),
            "shared": self.shared,
            "masks": [mask.to_dict() for mask in self.masks],
            "lambdas": None if self.lambdas is None else [
                {key: np.asarray(value, dtype=float).tolist() for key, value in lam.items()}
                for lam in self.lambdas],
            # Only when set, so genotypes without shuffle units (and the shipped ones) keep their format.
            **{key: value for key, value in (("bypass", self.bypass), ("cell_bn", self.cell_bn))
               if value is not None},
        }

    def save(self, path):
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """Read and validate a genotype file; any problem raises GenotypeError naming the file and field."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise GenotypeError(f"genotype file not found: {path}; pass the genotype.json written by "
                                f"search") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GenotypeError(f"cannot read genotype file {path}: {e}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                                f"fix the file or derive it again") from None
        try:
            return cls.from_dict(obj)
        except GenotypeError as e:
            raise GenotypeError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, obj, where="genotype"):
        """Validate a parsed genotype document (see to_dict for the format)."""
        _expect_keys(obj, where, required=("version", "skeleton", "space", "shared", "masks"),
                     optional=("lambdas", "bypass", "cell_bn"))
        if obj["version"] != GENOTYPE_VERSION:
            raise GenotypeError(f"{where}.version: expected {GENOTYPE_VERSION}, got {obj['version']!r}; "
                                f"this dsonas reads version {GENOTYPE_VERSION} files")
        skeleton = _build(Skeleton, obj["skeleton"], f"{where}.skeleton", where,
                          ("kind", "filters", "stages", "num_classes", "input_size"), lists=("stages",))
        spec = _build(BlockSpec, obj["space"], f"{where}.space", where,
                      ("levels", "ops", "merge", "sep_repeats"), lists=("ops",))
        shared = obj["shared"]
        if not isinstance(shared, bool):
            raise GenotypeError(f"{where}.shared: expected true or false, got {shared!r}")
        raw_masks = obj["masks"]
        expected = 1 if shared else skeleton.num_blocks
        if not isinstance(raw_masks, list) or len(raw_masks) != expected:
            got = len(raw_masks) if isinstance(raw_masks, list) else type(raw_masks).__name__
            reason = "a shared genotype" if shared else f"one per block of stages {list(skeleton.stages)}"
            raise GenotypeError(f"{where}.masks: expected a list of {expected} masks ({reason}), got {got}")
        masks = [_parse_mask(spec, raw, f"{where}.masks[{i}]") for i, raw in enumerate(raw_masks)]
        lambdas = obj.get("lambdas")
        if lambdas is not None:
            if not isinstance(lambdas, list) or len(lambdas) != len(masks):
                raise GenotypeError(f"{where}.lambdas: expected null or a list of {len(masks)} entries "
                                    f"(one per mask)")
            lambdas = [_parse_lambdas(spec, lam, f"{where}.lambdas[{i}]") for i, lam in enumerate(lambdas)]
        bypass, cell_bn = _parse_units(obj, skeleton, where)
        return cls(skeleton=skeleton, spec=spec, shared=shared, masks=masks, lambdas=lambdas, bypass=bypass,
                   cell_bn=cell_bn)

    def summary(self):
        """Human-readable multi-line description (printed at the end of a search)."""
        spec = self.spec
        space = "share" if self.shared else "full"
        skeleton = self.skeleton
        lines = [f"genotype: {space} space, {spec.levels} levels x {spec.n_ops} ops, merge {spec.merge}, "
                 f"skeleton {skeleton.kind} {list(skeleton.stages)} x {skeleton.filters} filters"]
        for i, mask in enumerate(self.masks):
            title = "all blocks" if self.shared else f"block {i}"
            live = mask.live_slots()
            lines.append(f"{title}: {len(live)}/{spec.num_op_slots} ops, {mask.num_edges()} edges"
                         + (" (identity)" if mask.is_identity else ""))
            for o in live:
                sources = ", ".join("in" if k == 0 else f"op{k - 1}" for k in mask.inputs[o])
                lines.append(f"  op{o} L{spec.level_of(o)} {spec.op_name(o)} <- {sources}")
            if not mask.is_identity:  # a shuffle cell's skip path is the unit's other half, not "+ in"
                residual = "" if skeleton.is_shuffle else " + in"
                lines.append(f"  out = {spec.merge}({', '.join(f'op{o}' for o in mask.outputs)}){residual}")
        return "\n".join(lines)


def _expect_keys(obj, where, required, optional=()):
    if not isinstance(obj, dict):
        raise GenotypeError(f"{where}: expected an object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise GenotypeError(f"{where}.{key}: missing")
    for key in obj:
        if key not in required and key not in optional:
            raise GenotypeError(f"{where}.{key}: unknown key; expected {', '.join(required + optional)}")


def _build(cls, raw, where, root, keys, lists):
    """Construct Skeleton/BlockSpec from a JSON object; their ConfigError becomes a GenotypeError."""
    _expect_keys(raw, where, required=keys)
    for key in lists:
        if not isinstance(raw[key], list):
            raise GenotypeError(f"{where}.{key}: expected a list, got {raw[key]!r}")
    try:
        return cls(**{key: tuple(raw[key]) if key in lists else raw[key] for key in keys})
    except ConfigError as e:
        raise GenotypeError(f"{root}.{e}") from None


def _int_list(raw, where, what):
    if not isinstance(raw, list):
        raise GenotypeError(f"{where}: expected a list of {what}, got {raw!r}")
    for value in raw:
        if not isinstance(value, int) or isinstance(value, bool):
            raise GenotypeError(f"{where}: expected integer {what}, got {value!r}")
    return tuple(raw)


def _parse_mask(spec, raw, where):
    _expect_keys(raw, where, required=("inputs", "outputs"))
    if not isinstance(raw["inputs"], list):
        raise GenotypeError(f"{where}.inputs: expected a list (one list of nodes per op slot)")
    inputs = tuple(_int_list(nodes, f"{where}.inputs[{o}]", "node indices")
                   for o, nodes in enumerate(raw["inputs"]))
    mask = BlockMask(inputs=inputs, outputs=_int_list(raw["outputs"], f"{where}.outputs", "op slots"))
    check_mask(spec, mask, where)
    return mask


def _parse_units(obj, skeleton, where):
    """(bypass, cell_bn) of a genotype document: null or absent = the defaults."""
    bypass, cell_bn = obj.get("bypass"), obj.get("cell_bn")
    if bypass is not None and bypass not in BYPASSES:
        raise GenotypeError(f"{where}.bypass: unknown bypass {bypass!r}; use one of {', '.join(BYPASSES)} "
                            f"or null for the skeleton's default")
    if cell_bn is not None and not isinstance(cell_bn, bool):
        raise GenotypeError(f"{where}.cell_bn: expected true, false or null (BN after cells that sum "
                            f"several ops), got {cell_bn!r}")
    for key, value in (("bypass", bypass), ("cell_bn", cell_bn)):
        if value is not None and not skeleton.is_shuffle:
            raise GenotypeError(f"{where}.{key}: applies to shuffle skeletons only, not {skeleton.kind!r}; "
                                f"remove it")
    return bypass, cell_bn


def _parse_lambdas(spec, raw, where):
    shapes = spec.lambda_shapes()
    _expect_keys(raw, where, required=tuple(shapes))
    out = {}
    for key, shape in shapes.items():
        try:
            value = np.asarray(raw[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise GenotypeError(f"{where}.{key}: expected numbers shaped {shape}") from None
        if value.shape != shape:
            raise GenotypeError(f"{where}.{key}: expected shape {shape}, got {value.shape}")
        if not np.isfinite(value).all():
            raise GenotypeError(f"{where}.{key}: contains NaN or infinity")
        out[key] = value
    return out
