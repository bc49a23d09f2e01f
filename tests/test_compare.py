import csv
import io
import json

import pytest
from common import run_tool
from test_report import ABLATION, SMALL, make_search_run

from dsonas.config import config_to_dict, load_config
from dsonas.genotype import Genotype
from dsonas.random_search import run_random_search
from dsonas.report import COLUMNS, compare_rows, format_table
from dsonas.runs import RunDir


def make_retrain_run(out, name, genotype, accs):
    cfg = load_config(overrides=SMALL)
    run = RunDir.create(out, name, config_to_dict(cfg))
    genotype.save(run.path / "genotype.json")
    for e, acc in enumerate(accs):
        run.write_metrics({"stage": "retrain", "epoch": e + 1, "epochs": len(accs), "train_acc": acc + 0.1,
                           "train_loss": 1.0, "test_acc": acc, "test_loss": 1.2, "epoch_time": 10.0})
    run.save_json("retrain.json", {"width_mult": 1.0, "epochs_done": len(accs), "epochs": len(accs),
                                   "best_acc": max(accs), "last_acc": accs[-1], "params": 12345,
                                   "macs": 678900})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    search, genotype = make_search_run(out, "search", overrides=ABLATION)
    cfg = load_config(overrides=SMALL)
    rand = RunDir.create(out, "rand", config_to_dict(cfg))
    summary = run_random_search(cfg, rand, 2, seed=1)
    random_1 = Genotype.load(rand.path / summary["genotypes"][1]["path"])
    rt_search = make_retrain_run(out, "rt-search", genotype, [0.5, 0.7, 0.6])
    rt_random = make_retrain_run(out, "rt-random", random_1, [0.4, 0.45])
    return {"search": search.path, "rand": rand.path, "rt-search": rt_search.path,
            "rt-random": rt_random.path, "summary": summary}


def test_rows(runs):
    rows = compare_rows([runs["search"], runs["rand"], runs["rt-search"], runs["rt-random"]])
    assert [(r["name"], r["kind"], r["source"]) for r in rows] == [
        ("search", "search", None), ("rand/random_000", "random", None), ("rand/random_001", "random", None),
        ("rt-search", "retrain", "search"), ("rt-random", "retrain", "rand/random_001")]
    search, rand0, _, rt_search, rt_random = rows
    summary = json.loads((runs["search"] / "search_summary.json").read_text())
    assert (search["params"], search["macs"]) == (summary["derived_params"], summary["derived_macs"])
    assert search["supernet_acc"] == 0.42 and search["search_s"] == 10.0  # 4 search epochs of 2.5 s
    assert (search["split"], search["pretrain_epochs"], search["ratio"], search["penalty"]) == (
        False, 0, "4:1", "flops")
    entry = runs["summary"]["genotypes"][0]
    assert (rand0["params"], rand0["macs"], rand0["space"]) == (entry["params"], entry["macs"], "share")
    assert (rt_search["best_acc"], rt_search["last_acc"], rt_search["train_s"]) == (0.7, 0.6, 30.0)
    assert (rt_search["params"], rt_search["macs"]) == (12345, 678900)
    # A retrain inherits the settings and search time of the run its genotype came from.
    assert (rt_search["split"], rt_search["ratio"], rt_search["search_s"]) == (False, "4:1", 10.0)
    assert (rt_random["best_acc"], rt_random["last_acc"], rt_random["split"]) == (0.45, 0.45, None)
    # Without its source on the command line a retrain row still has its own figures.
    alone = compare_rows([runs["rt-search"]])[0]
    assert alone["source"] is None and alone["split"] is None and alone["best_acc"] == 0.7


def test_formats(runs):
    import compare

    paths = [str(runs[k]) for k in ("search", "rand", "rt-search")]
    code, out = run_tool_output(compare.main, paths)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "kind", "from", "space"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:2] == ["search", "search"]
    assert lines[5].split()[:4] == ["rt-search", "retrain", "search", "share"]
    assert "0.7000" in lines[5] and "0.6000" in lines[5] and "12.35k" in lines[5] and "678.9k" in lines[5]
    code, out = run_tool_output(compare.main, [*paths, "--csv"])
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == list(COLUMNS) and len(table) == 4
    assert table[3]["best_acc"] == "0.7" and table[0]["ratio"] == "4:1" and table[3]["supernet_acc"] == ""
    code, out = run_tool_output(compare.main, [*paths, "--json"])
    assert json.loads(out) == compare_rows(paths)
    assert format_table([], "text").splitlines()[0].startswith("run")


def run_tool_output(main, argv):
    """Exit code and stdout of a tool run through run_tool."""
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        run_tool(lambda: main(argv))
    return exit_info.value.code, buf.getvalue()


def test_missing_run(tmp_path, capsys):
    import compare

    code, _ = run_tool_output(compare.main, [str(tmp_path / "nope")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: run folder")
