"""What a new user met walking through `plot` and `list` (and a run into their own folder):

- `plot -o` into a missing folder, or to a file matplotlib cannot write (`notes.txt`, no suffix),
  is one line naming `-o` and what was expected (exit 2), before any work and touching no file;
  the same with `--partition`;
- `plot --partition SCENARIO` without `-o` writes `partition.png` and says so, as `plot` does;
- a folder holding only the user's own metrics.csv is not "a run that did not finish": it is
  refused, `--rerun` and `--resume` too, and the file is left as it was;
- `list` summaries end at the first sentence, not at "et al." or "Sec.", come from the docstring
  that describes the entry, and a method without a graph is not called "central server".
"""

from __future__ import annotations

import pytest

from fedsim import registry, runfolder
from fedsim.cli import main
from fedsim.listing import first_sentence, one_line
from tests.test_usability import fake_run, scenario


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("fedsim: error: ") and "Traceback" not in err, err
    return err.strip()


# ---------------------------------------------------------------------------------------------
# plot -o


@pytest.fixture
def runs(tmp_path, monkeypatch):
    fake_run(tmp_path / "runs", "a", scenario())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("partition", [False, True], ids=["runs", "partition"])
def test_an_output_in_a_missing_folder_is_one_line(runs, write_scenario, capsys, partition):
    source = ["--partition", str(write_scenario())] if partition else ["runs"]
    code, out, err = run_cli(capsys, "plot", *source, "-o", "nodir/x.png")
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert "-o nodir/x.png: the folder nodir does not exist" in line
    assert not (runs / "nodir").exists()


@pytest.mark.parametrize("partition", [False, True], ids=["runs", "partition"])
def test_an_output_matplotlib_cannot_write_is_one_line_and_touches_nothing(runs, write_scenario, capsys, partition):
    source = ["--partition", str(write_scenario())] if partition else ["runs"]
    (runs / "notes.txt").write_text("my notes")
    before = sorted(p.name for p in runs.iterdir())
    code, _, err = run_cli(capsys, "plot", *source, "-o", "notes.txt")
    line = one_error_line(err)
    assert code == 2 and "-o notes.txt: expected an image file name ending in one of" in line
    assert ".png" in line and ".pdf" in line and ".svg" in line and line.endswith("(got .txt)")
    assert (runs / "notes.txt").read_text() == "my notes"
    code, _, err = run_cli(capsys, "plot", *source, "-o", "figure")  # matplotlib would write figure.png
    assert code == 2 and one_error_line(err).endswith("(got no suffix)")
    code, _, err = run_cli(capsys, "plot", *source, "-o", "runs")
    assert code == 2 and "-o runs: is a folder" in one_error_line(err)
    assert sorted(p.name for p in runs.iterdir()) == before


def test_an_upper_case_suffix_is_an_image_too(runs, capsys):
    code, out, _ = run_cli(capsys, "plot", "runs", "-o", "curves.PNG")
    assert code == 0 and out.strip() == "curves.PNG"
    assert (runs / "curves.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partition_without_output_writes_the_default_and_says_so(runs, write_scenario, capsys):
    code, out, err = run_cli(capsys, "plot", "--partition", str(write_scenario()))
    assert code == 0 and err == ""
    assert out.startswith("partition.png (the default; choose the file with -o): mean label entropy ")
    assert (runs / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "plot", "--partition", str(write_scenario()), "-o", "split.svg")
    assert code == 0 and out.startswith("split.svg: mean label entropy ")
    assert (runs / "split.svg").read_text().lstrip().startswith("<?xml")


# ---------------------------------------------------------------------------------------------
# a folder of the user's own files under a run's name


def test_a_folder_with_only_a_users_metrics_csv_is_refused_even_with_rerun(tmp_path, write_scenario, capsys):
    folder = tmp_path / "out" / "small"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("my,own\n1,2\n")
    path = str(write_scenario())
    for extra in ([], ["--rerun"]):
        code, _, err = run_cli(capsys, "run", path, "--out", str(tmp_path / "out"), "--no-progress", *extra)
        line = one_error_line(err)
        assert code == 2 and f"{folder}: holds files fedsim did not write (metrics.csv" in line
        assert "did not finish" not in line and "--resume" not in line
    code, _, err = run_cli(capsys, "run", "--resume", str(folder), "--no-progress")
    assert code == 2 and "holds files fedsim did not write (metrics.csv" in one_error_line(err)
    assert [p.name for p in folder.iterdir()] == ["metrics.csv"]
    assert (folder / "metrics.csv").read_text() == "my,own\n1,2\n"
    with pytest.raises(runfolder.RunFolderError):
        runfolder.inspect(folder)


def test_a_run_folder_with_its_scenario_is_still_fedsims(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "scenario.toml").write_text('name = "run"\n')
    (folder / "metrics.csv").write_text("round,test_accuracy\n0,0.1\n")
    assert runfolder.inspect(folder).kind == "unfinished"


# ---------------------------------------------------------------------------------------------
# list


@pytest.mark.parametrize("text, first", [
    ("FedPer (Arivazhagan et al. 2019): a head. More.", "FedPer (Arivazhagan et al. 2019): a head."),
    ("Bulyan (ICML 2018, Sec. 4) over Krum. More.", "Bulyan (ICML 2018, Sec. 4) over Krum."),
    ("Each edge rewired with prob. p. More.", "Each edge rewired with prob. p."),
    ("Robust rules (e.g. Krum, i.e. a rule) vs. the mean. Fig. 2 shows it. More.",
     "Robust rules (e.g. Krum, i.e. a rule) vs. the mean."),
    ("See Eq. 3 of J. Smith. More.", "See Eq. 3 of J. Smith."),
    ("One sentence without a full stop", "One sentence without a full stop"),
    ("Done. Next.", "Done."),
])
def test_first_sentence_skips_abbreviations(text, first):
    assert first_sentence(text) == first


def test_list_summaries_are_whole_first_sentences_from_the_right_docstring(capsys):
    code, out, _ = run_cli(capsys, "list", "algorithms")
    flat = " ".join(out.split())
    assert code == 0
    assert "(Wang et al. 2019, \"Federated Evaluation of On-device Personalization\")." in flat
    assert "and FedPer (Arivazhagan et al. 2019): a shared body (the representation) and a personal head." in flat
    assert "central server" not in flat
    assert "modest MoDeST: mostly-consistent decentralized sampling training" in flat
    assert "EuroMLSys 2025). no graph (no [topology] table); keys: sample_size" in flat
    assert "fedavg FedAvg (McMahan et al., AISTATS 2017): local SGD on sampled clients, example-weighted average. " \
           "no graph (no [topology] table); keys: clients_per_round, deadline, sampler" in flat
    code, out, _ = run_cli(capsys, "list", "algorithms", "modest")
    assert code == 0 and out.splitlines()[1] == "runs without a graph: no [topology] table"

    code, out, _ = run_cli(capsys, "list", "models")
    flat = " ".join(out.split())
    assert "Built-in models" not in flat and "batch_norm:" not in flat
    assert "logreg Multinomial logistic regression: one linear layer on the flattened input (the FedProx paper's " \
           "model for Synthetic data). minilm" in flat
    assert "mlp A multilayer perceptron with ReLU: `hidden` widths, one per layer (McMahan et al.'s 2NN is " \
           "[200, 200]). keys: hidden, batch_norm" in flat
    assert "The two-conv network of McMahan et al. (2017) for 28x28 images, width configurable." in flat

    code, out, _ = run_cli(capsys, "list", "topologies")
    flat = " ".join(out.split())
    assert "Registry entry" not in flat
    assert "from_file Load a measured or hand-made network: an edge list (`u v` per line, `#` comments) or GraphML." in flat
    assert "each edge rewired with prob. p." in flat

    code, out, _ = run_cli(capsys, "list", "aggregators")
    flat = " ".join(out.split())
    assert "Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, Sec. 4, Algorithm 1) over Krum." in flat
    assert "multi_krum Multi-Krum (Blanchard et al. 2017, Sec. 4): the mean of the m updates" in flat


def test_a_registered_wrapper_is_described_by_its_public_namesake():
    entry = registry.topologies.get("from_file")
    assert entry.__name__.startswith("_")
    assert one_line(entry, "from_file").startswith("Load a measured or hand-made network")
    assert one_line(registry.models.get("cnn"), "cnn").startswith("The two-conv network")
    assert one_line(registry.algorithms.get("fedadam"), "fedadam").startswith("FedOpt (Reddi")  # its module's


@pytest.mark.parametrize("args", [["list"], ["list", "datasets"], ["list", "datasets", "synthetic"],
                                  ["list", "models", "mlp"], ["list", "algorithms", "fedavg"]])
def test_list_output_ends_with_one_newline(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and err == ""
    assert out.endswith("\n") and not out.endswith("\n\n")
