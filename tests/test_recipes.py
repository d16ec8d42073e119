"""Recipes (``recipes/*.yaml``, read by ``train.train``): a recipe's settings over its base's, over
the flags' defaults, under the command line; a loop of bases and a key that is no training setting are
refused with one clear line; and a recipe's operating point travels through training and export into
``open_set.npz``, the answer of the offline predictor and the archive's served answer."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TRAIN_ARGS, run_module

from handlers.archive import build
from landmark.open_set import OpenSet
from landmark.predict import Predictor
from landmark.run_files import OPEN_SET, read_meta
from train.train import RECIPES_DIR, get_args_parser, load_recipe, parse_args


def write_recipe(folder: Path, name: str, settings: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def refusal(capsys: pytest.CaptureFixture, name: str) -> str:
    """The one line ``train.train`` exits 2 with for this recipe."""
    with pytest.raises(SystemExit) as stopped:
        load_recipe(name, get_args_parser())
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_every_committed_recipe_loads() -> None:
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        settings = load_recipe(path.stem, get_args_parser())
        assert settings["recipe"] == path.stem and settings["arch"] in ("scratch", "transfer"), path.name


def test_a_recipe_overrides_its_base_chain_and_the_command_line_overrides_it(tmp_path: Path) -> None:
    """wh13-ci -> wh13 -> transfer: each level's value wins over the one below it."""
    settings = load_recipe("wh13-ci", get_args_parser())
    assert (settings["arch"], settings["backbone"], settings["input_size"]) == ("transfer", "lite0", "224")  # own
    assert settings["data_dir"] == "../shared/data/world_heritage13" and settings["min_precision"] == "0.98"  # wh13's
    assert settings["weight_decay"] == "0.01" and settings["batch_size"] == "64"  # transfer's
    assert settings["lr"] == "0.002" and settings["drop_path"] == "0.0"  # own, over wh13's 1e-3 and 0.2
    assert settings["negatives"] == [Path("../shared/data/everyday/train"),
                                     Path("../shared/data/indian_monuments49/train")]
    args = parse_args(["--recipe", "wh13-ci", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path),
                       "--negatives", "--epochs", "3", "--backbone", "lite2"])
    assert (args.epochs, args.backbone, args.data_dir, args.negatives) == (3, "lite2", tmp_path, [])
    assert (args.input_size, args.lr, args.min_precision, args.views) == ("224", 2e-3, 0.98, 1)  # typed by the flags


def test_a_base_given_as_a_file_and_a_recipe_file_path(tmp_path: Path) -> None:
    base = write_recipe(tmp_path, "mine-base", {"base": "transfer", "epochs": 2, "lr": 0.5})
    child = write_recipe(tmp_path, "mine", {"base": str(base), "lr": 0.25})
    settings = load_recipe(str(child), get_args_parser())
    assert (settings["recipe"], settings["epochs"], settings["lr"], settings["backbone"]) == ("mine", "2", "0.25",
                                                                                            "lite0")


def test_a_loop_of_bases_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "loop-a.yaml", tmp_path / "loop-b.yaml"
    write_recipe(tmp_path, "loop-a", {"base": str(b), "epochs": 1})
    write_recipe(tmp_path, "loop-b", {"base": str(a), "arch": "scratch"})
    assert refusal(capsys, str(a)).endswith(f"recipe {a}: its bases loop (loop-a -> loop-b -> loop-a)")
    write_recipe(tmp_path, "self", {"base": str(tmp_path / "self.yaml")})
    assert "its bases loop (self -> self)" in refusal(capsys, str(tmp_path / "self.yaml"))


def test_an_unknown_key_or_a_run_setting_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    typo = write_recipe(tmp_path, "typo", {"base": "transfer", "epochz": 3})
    assert refusal(capsys, str(typo)).endswith(f"recipe {typo}: 'epochz' is not a training setting")
    inherited = write_recipe(tmp_path, "inherits-typo", {"base": str(typo)})  # named by whichever file reads it
    assert "'epochz' is not a training setting" in refusal(capsys, str(inherited))
    for key, value in (("out", "somewhere"), ("resume", True), ("recipe", "wh13")):
        path = write_recipe(tmp_path, f"sets-{key}", {"base": "transfer", key: value})
        assert refusal(capsys, str(path)).endswith(f"{key!r} is not a training setting"), key


def test_a_missing_recipe_or_one_that_is_no_mapping_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = refusal(capsys, "no-such-recipe")
    assert "recipe 'no-such-recipe' not found" in line and "known recipes: " in line and "wh13-ci" in line
    listed = tmp_path / "listed.yaml"
    listed.write_text("- epochs\n- 3\n", encoding="utf-8")
    assert refusal(capsys, str(listed)).endswith("expected a mapping of setting: value")
    missing_base = write_recipe(tmp_path, "orphan", {"base": "no-such-base"})
    assert "recipe 'no-such-base' not found" in refusal(capsys, str(missing_base))


def test_a_bad_or_missing_value_is_refused_before_anything_runs(tiny_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    bad = write_recipe(tmp_path, "bad-value", {"base": "scratch", "data-dir": str(tiny_data), "batch-size": 0})
    with pytest.raises(SystemExit):  # checked by the flag's own type, as on the command line
        parse_args(["--recipe", str(bad), "--out", str(tmp_path / "o")])
    assert "--batch-size" in capsys.readouterr().err
    baseless = write_recipe(tmp_path, "baseless", {"arch": "scratch", "data-dir": str(tiny_data), "epochs": 1})
    with pytest.raises(SystemExit):
        parse_args(["--recipe", str(baseless), "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"recipe {str(baseless)!r} sets no --lr, --batch-size, --weight-decay, --patience, --min-scale: give them, "
        "or a base recipe that does")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def recipe_model(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained through ``make train RECIPE=<file>`` from a recipe with its own operating point."""
    folder = tmp_path_factory.mktemp("recipe_model")
    flags = dict(zip(TINY_TRAIN_ARGS[::2], TINY_TRAIN_ARGS[1::2], strict=True))
    settings = {flag.removeprefix("--"): value for flag, value in flags.items()}
    settings |= {"base": "scratch", "data-dir": str(tiny_data), "min-precision": 0.9}
    recipe = write_recipe(folder, "tiny", settings)
    out = folder / "run"
    done = run_module("train.train", "--recipe", str(recipe), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"recipe {recipe}, scratch" in done.stdout  # a recipe given as a file is recorded by its path
    exported = run_module("train.export", "--run-dir", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    return out


def test_the_recipes_operating_point_is_the_stored_one(recipe_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    assert read_meta(recipe_model).model.recipe.endswith("tiny.yaml")
    assert OpenSet.load(recipe_model / OPEN_SET).min_precision == 0.9
    photo = sorted((tiny_data / "test").rglob("*.jpg"))[0]
    answer = Predictor.from_dir(recipe_model, "onnx", device="cpu", threads=1).predict([photo])[0]
    assert answer["operating_point"]["min_precision"] == 0.9
    with zipfile.ZipFile(build(recipe_model, "onnx", "landmark", "1.0", tmp_path / "store")) as z:
        z.extract(OPEN_SET, tmp_path)
    assert OpenSet.load(tmp_path / OPEN_SET).min_precision == 0.9  # what the served model decides at


def test_export_flag_overrides_the_recipes_operating_point(recipe_model: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "metrics.json"):
        (run / name).write_bytes((recipe_model / name).read_bytes())
    done = run_module("train.export", "--run-dir", str(run), "--min-precision", "0.8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert OpenSet.load(run / OPEN_SET).min_precision == 0.8
