"""coap_plugins.recipes: the packaged recipes, addressed by name from coap-train and LightningCLI."""

from pathlib import Path

import pytest

from coap_plugins.recipes import RECIPES_DIR, available_recipes, recipe_path, resolve_recipe


def test_packaged_recipes_are_listed_by_folder_and_stem():
    names = available_recipes()
    assert len(names) == 19 and names == sorted(names)
    assert {"composer/resnet18_digits", "lightning/unet_ddpm_digits", "lightningcli/small_cnn_digits"} <= set(names)
    for name in names:
        assert recipe_path(name).is_file()


def test_recipe_resolves_by_name():
    expected = RECIPES_DIR / "composer" / "resnet18_digits.yaml"
    assert recipe_path("composer/resnet18_digits") == expected
    assert recipe_path("composer/resnet18_digits.yaml") == expected
    assert (
        recipe_path("small_cnn_digits") == RECIPES_DIR / "lightningcli" / "small_cnn_digits.yaml"
    )  # one folder has it
    with pytest.raises(
        FileNotFoundError,
        match="'resnet18_digits' is ambiguous: give one of composer/resnet18_digits, lightning/resnet18_digits",
    ):
        recipe_path("resnet18_digits")


def test_unknown_recipe_is_one_line_listing_the_packaged_ones():
    with pytest.raises(FileNotFoundError) as info:
        recipe_path("composer/nope")
    message = str(info.value)
    assert message.startswith("Recipe not found: composer/nope (no such file")
    assert "\n" not in message and all(name in message for name in available_recipes())
    # a name with a folder is never matched by its stem alone
    with pytest.raises(FileNotFoundError, match="Recipe not found: elsewhere/resnet18_digits"):
        recipe_path("elsewhere/resnet18_digits")


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "composer").mkdir()
    own = Path("composer") / "resnet18_digits.yaml"
    own.write_text("seed: 1\n")
    assert resolve_recipe(own) == own
    assert resolve_recipe("composer/resnet18_digits") == RECIPES_DIR / "composer" / "resnet18_digits.yaml"


def test_coap_train_takes_a_recipe_name(capsys):
    pytest.importorskip("omegaconf")
    from coap_plugins.train.cli import main

    # the packaged recipe is found and read (the bad override is reported, not a missing file)
    assert main(["composer/resnet18_digits", "optimizer.lrr=1"]) == 2
    assert "coap-train: error: Unknown key 'optimizer.lrr'" in capsys.readouterr().err
    assert main(["composer/resnet18_digitz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coap-train: error: Recipe not found: composer/resnet18_digitz") and "\n" not in err
    assert "composer/resnet18_digits," in err


def test_packaged_recipes_load_by_name_with_their_bases():
    pytest.importorskip("omegaconf")
    from coap_plugins.train.config import load_config

    lightning = load_config(recipe_path("lightning/resnet18_digits"))  # base: ../composer/resnet18_digits.yaml
    composer = load_config(recipe_path("composer/resnet18_digits"))
    assert lightning.trainer == "lightning" and composer.trainer == "composer"
    assert lightning.optimizer == composer.optimizer and lightning.coap == composer.coap


def test_lightning_cli_config_takes_a_recipe_name(tmp_path):
    pytest.importorskip("lightning")
    from coap_plugins.examples.lightning_cli import _resolve_config_args

    path = str(RECIPES_DIR / "lightningcli" / "small_cnn_digits.yaml")
    assert _resolve_config_args(["fit", "--config", "lightningcli/small_cnn_digits"]) == ["fit", "--config", path]
    assert _resolve_config_args(["fit", "--config=small_cnn_digits"]) == ["fit", f"--config={path}"]
    own = tmp_path / "mine.yaml"
    own.write_text("seed_everything: 1\n")
    assert _resolve_config_args(["fit", "--config", str(own)]) == ["fit", "--config", str(own)]
