import pytest

from pipeline.cli import build_parser
from pipeline.config import ConfigError, config_from_args


def test_every_stage_registers_its_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"extract", "index", "search", "rerank", "evaluate", "run", "mine", "train", "reindex"} <= set(sub.choices)


def test_options_win_over_config_file_and_set(tmp_path):
    from pipeline.run import RunConfig

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("database: from-file\ncandidates: 7\nreranker: none\n")
    args = build_parser().parse_args(["run", "--config", str(cfg_file), "--database", "sequence:db",
                                      "--queries", "q.csv", "--image-size", "272", "480",
                                      "--set", "candidates=5", "--set", "reranker=ransac"])
    cfg = config_from_args(RunConfig, args, ("database", "queries", "image_size", "candidates", "reranker"))
    assert cfg.database == "sequence:db" and cfg.queries == "q.csv"
    assert list(cfg.image_size) == [272, 480]
    assert cfg.candidates == 5 and cfg.reranker == "ransac"


def test_renamed_option_and_bad_override(tmp_path):
    from pipeline.reindex import ReindexConfig

    args = build_parser().parse_args(["reindex", "--source", "imgs", "--store", "st", "--keep", "4"])
    cfg = config_from_args(ReindexConfig, args, ("source", "store", ("keep", "keep_versions")))
    assert cfg.keep_versions == 4 and cfg.source == "imgs"
    args = build_parser().parse_args(["reindex", "--set", "no_such_key=1"])
    with pytest.raises(ConfigError, match="no_such_key"):
        config_from_args(ReindexConfig, args, ())


def test_one_image_size_form_for_every_subcommand(capsys):
    """``--image-size H W`` and ``--image-size H,W`` both work wherever the option exists, and
    every subcommand's --help says so the same way."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    having = [name for name, p in sub.choices.items()
              if any("--image-size" in a.option_strings for a in p._actions)]
    assert {"extract", "rerank", "run"} <= set(having)  # evaluate takes no images: it scores a run
    for name in having:
        sp = sub.choices[name]
        action = next(a for a in sp._actions if "--image-size" in a.option_strings)
        assert "'H W' or 'H,W'" in action.help, (name, action.help)
        for form in (["272", "480"], ["272,480"]):
            ns, _ = sp.parse_known_args(["--image-size", *form])
            assert list(ns.image_size) == [272, 480], (name, form)
        with pytest.raises(SystemExit):
            sp.parse_known_args(["--image-size", "272"])
    assert "height and a width" in capsys.readouterr().err


def test_run_takes_a_list_of_rerankers_and_checks_each(tmp_path, capsys):
    """`r2f run --reranker ransac,r2former`: a comma list of known names (no fixed choices); a
    listed r2former without trained reranker weights stops the run before it touches OUT."""
    from pipeline.run import RunConfig, run

    parser = build_parser()
    args = parser.parse_args(["run", "--reranker", "ransac, r2former", "--database", "d", "--queries", "q"])
    assert args.reranker == "ransac,r2former"
    for bad in ("ransac,magsac", "ransac,,none"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--reranker", bad])
        assert "give a comma list of auto, r2former, ransac, none" in capsys.readouterr().err
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="include no trained reranker"):
        run(RunConfig(database="sequence:db", queries="sequence:q", out=str(out), backbone="efficientnet-lite0",
                      reranker="ransac,r2former"))
    with pytest.raises(ValueError, match="unknown reranker"):
        run(RunConfig(database="sequence:db", queries="sequence:q", out=str(out), reranker="ransac,magsac"))
    assert not out.exists()
