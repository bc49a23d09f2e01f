import numpy as np
import pytest
from common import run_tool
from PIL import Image

from dsonas import cost
from dsonas.config import config_to_dict, load_config
from dsonas.errors import RunFolderError
from dsonas.genotype import Genotype
from dsonas.network import compile_genotype
from dsonas.random_search import sample_genotypes, space_of
from dsonas.report import DAG_PANEL, DPI, FIGSIZE, build_report, read_run
from dsonas.runs import RunDir

SMALL = ["skeleton.stages=[1, 1, 1]", "skeleton.filters=8", "skeleton.num_classes=10", "data.input_size=16",
         "search.epochs=4"]
ABLATION = ["search.split=false", "pretrain.epochs=0", "search.ratio=[4, 1]", "search.penalty=flops"]
PLOT = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def final_lambdas(spec, mask, rng):
    """λ as a search leaves them: positive on the mask's edges, exactly 0 everywhere else."""
    lam = {}
    for key, shape in spec.lambda_shapes().items():
        arr = np.zeros(shape)
        if key == "out":
            arr[list(mask.outputs)] = rng.uniform(0.1, 1.5, len(mask.outputs))
        else:
            for row, slot in enumerate(spec.level_slots(int(key[2:]))):
                arr[row, list(mask.inputs[slot])] = rng.uniform(0.1, 1.5, len(mask.inputs[slot]))
        lam[key] = arr
    return lam


def make_search_run(out, name, shared=True, trajectories=False, overrides=(), seed=3):
    """A search run folder as the engine leaves it: config.yaml, metrics.jsonl, genotype.json, summary."""
    cfg = load_config(overrides=[*SMALL, f"space.kind={'share' if shared else 'full'}", *overrides])
    spec, skeleton, _ = space_of(cfg)
    masks = sample_genotypes(spec, skeleton, 1, seed=seed, shared=shared)[0].genotype.masks
    rng = np.random.default_rng(seed)
    lambdas = [final_lambdas(spec, m, rng) for m in masks]
    genotype = Genotype(skeleton=skeleton, spec=spec, shared=shared, masks=masks, lambdas=lambdas)
    run = RunDir.create(out, name, config_to_dict(cfg))
    genotype.save(run.path / "genotype.json")
    stages = ["pretrain"] * cfg.pretrain.epochs + ["search"] * cfg.search.epochs
    for e, stage in enumerate(stages):
        rec = {"stage": stage, "epoch": e + 1, "epochs": len(stages), "iteration": 10 * (e + 1),
               "w_loss": 2.0 - 0.2 * e, "w_acc": 0.2 + 0.1 * e, "lam_loss": 2.1 - 0.2 * e,
               "lam_acc": 0.15 + 0.1 * e, "sparsity": 0.1 * e, "live_ops": [16 - e] * skeleton.num_blocks,
               "derived_params": 60000 - 1000 * e, "derived_macs": 4e6 - 2e5 * e, "epoch_time": 2.5}
        if trajectories:
            fade = max(0.0, 1 - e / (len(stages) - 1))
            rec["lambdas"] = [{k: np.where(v != 0, v, fade) for k, v in lam.items()} for lam in lambdas]
            rec["block_macs"] = [1e6 - 1e4 * e] * skeleton.num_blocks
        run.write_metrics(rec)
    report = cost.count(compile_genotype(genotype), (1, 3, 16, 16))
    run.save_json("search_summary.json", {"derived_params": report.params, "derived_macs": report.macs,
                                          "supernet_test_acc": 0.42, "sparsity": 0.3})
    return run, genotype


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 1  # something was drawn
        return img.size


def test_share_report(tmp_path):
    run, genotype = make_search_run(tmp_path, "share", overrides=ABLATION)
    files = build_report(run)
    assert set(files) == {"lambda.png", "sparsity.png", "accuracy.png", "block_flops.png", "genotype.png",
                          "report.md"}
    for name, path in files.items():
        assert path.parent == run.path / "report" and path.stat().st_size > 0
        if name.endswith(".png"):
            assert png_size(path) == PLOT, name
    md = files["report.md"].read_text()
    report = cost.count(compile_genotype(genotype), (1, 3, 16, 16))
    assert f"({report.params:,}), MACs" in md and f"({report.macs:,}) (FLOPs = 2 x MACs" in md
    assert "split training **off**, pre-training **0** epochs, W:λ ratio **4:1**, penalty **flops**" in md
    assert "epochs: search 4" in md and "supernet test accuracy after search: 0.4200" in md
    assert "key `lambdas`" in md and "no `block_macs`" in md  # what the engine did not record is named
    for name in files:
        if name.endswith(".png"):
            assert f"]({name})" in md
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")]


def test_full_report_with_trajectories(tmp_path):
    run, genotype = make_search_run(tmp_path, "full", shared=False, trajectories=True)
    files = build_report(run.path)
    # One DAG panel per block: 3 blocks -> one row of three.
    assert png_size(files["genotype.png"]) == (int(3 * DAG_PANEL[0] * DPI), int(DAG_PANEL[1] * DPI))
    for name in ("lambda.png", "sparsity.png", "accuracy.png", "block_flops.png"):
        assert png_size(files[name]) == PLOT
    md = files["report.md"].read_text()
    assert "λ trajectories" in md and "key `lambdas`" not in md and "block_macs" not in md
    assert "epochs: pretrain 2, search 4 (15 s)" in md
    assert "split training **on**, pre-training **2** epochs, W:λ ratio **1:1**, penalty **none**" in md


def test_rebuild_replaces_the_whole_report(tmp_path):
    run, _ = make_search_run(tmp_path, "r")
    build_report(run)
    (run.path / "genotype.json").unlink()
    (run.path / "report" / "stale.txt").write_text("old")
    files = build_report(run)
    assert sorted(p.name for p in (run.path / "report").iterdir()) == sorted(files)
    assert "genotype.png" not in files and "lambda.png" not in files
    assert "no genotype.json" in files["report.md"].read_text()


def test_bad_run_folders(tmp_path, capsys):
    import report as report_tool

    with pytest.raises(RunFolderError, match="not found"):
        read_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    for folder in ("missing", "plain"):
        with pytest.raises(SystemExit) as exit_info:
            run_tool(lambda f=folder: report_tool.main([str(tmp_path / f)]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    (tmp_path / "plain" / "config.yaml").write_text("a: [1,\n")
    with pytest.raises(RunFolderError, match="not valid YAML"):
        read_run(tmp_path / "plain")
