"""coap_plugins.train.config: the coap-train schema, overrides, base recipes and their errors."""

from pathlib import Path

import pytest

pytest.importorskip("omegaconf")

from coap_plugins.recipes import RECIPES_DIR  # noqa: E402
from coap_plugins.train.cli import main  # noqa: E402
from coap_plugins.train.config import ConfigError, load_config, to_yaml  # noqa: E402

YAMLS = RECIPES_DIR
RECIPES = sorted(p for p in (YAMLS / "composer").glob("*.yaml")) + sorted((YAMLS / "lightning").glob("*.yaml"))


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates():
    assert len(RECIPES) == 18
    for path in RECIPES:
        cfg = load_config(path)
        assert cfg.trainer == path.parent.name, path
        assert cfg.name == path.stem
        assert cfg.output_dir == str(Path("runs") / cfg.trainer / path.stem)


def test_lightning_recipes_are_the_composer_ones_with_another_trainer():
    for path in sorted((YAMLS / "lightning").glob("*.yaml")):
        lit = load_config(path)
        com = load_config(YAMLS / "composer" / path.name)
        lit.trainer = com.trainer
        lit.output_dir = com.output_dir
        assert lit == com, path.name


def test_base_recipe_and_null_section():
    adamw = load_config(YAMLS / "composer" / "resnet18_digits_adamw.yaml")
    coap = load_config(YAMLS / "composer" / "resnet18_digits.yaml")
    assert adamw.coap is None and coap.coap is not None and coap.coap.rank_ratio_conv == 4
    assert adamw.optimizer == coap.optimizer and adamw.max_duration == coap.max_duration
    eight = load_config(YAMLS / "composer" / "resnet18_digits_8bit.yaml")
    assert eight.coap.eight_bit is True and eight.coap.update_interval == coap.coap.update_interval


def test_paper_ddpm_cifar_settings():
    cfg = load_config(YAMLS / "composer" / "unet_ddpm_cifar10.yaml")
    assert cfg.coap.rank_ratio_matrix == cfg.coap.rank_ratio_conv == 1.5
    assert (cfg.coap.update_interval, cfg.coap.reproject_factor) == (32, 5)
    assert cfg.data.batch_size * cfg.devices == 128 and cfg.max_duration == "800000ba"
    assert (cfg.task.timesteps, cfg.task.beta_start, cfg.task.beta_end) == (1000, 1e-4, 0.02)
    # trained as DDPM trains: gradient norm clipped to 1, EMA 0.9999 (the digits recipe: 0.995 over 600 steps)
    assert cfg.clip_grad_norm == 1.0 and cfg.ema.decay == 0.9999
    digits = load_config(YAMLS / "lightning" / "unet_ddpm_digits_adamw.yaml")
    assert digits.clip_grad_norm == 1.0 and digits.ema.decay == 0.995 and digits.coap is None


def test_overrides_are_typed_and_nested(tmp_path):
    path = _write(tmp_path, "trainer: lightning\ncoap: {rank_ratio_conv: 4}\n")
    cfg = load_config(path, ["optimizer.lr=3e-4", "coap.update_interval=8", "model.widths=[16,32]", "data.path=null"])
    assert cfg.optimizer.lr == 3e-4 and cfg.coap.update_interval == 8 and cfg.model.widths == [16, 32]
    assert cfg.coap.rank_ratio_conv == 4.0 and cfg.data.path is None
    assert load_config(path, ["coap=null"]).coap is None
    # the resolved recipe round-trips through YAML
    again = load_config(_write(tmp_path, to_yaml(cfg), "again.yaml"))
    again.name, again.output_dir = cfg.name, cfg.output_dir
    assert again == cfg


def test_unknown_key_lists_valid_keys_and_closest_match(tmp_path):
    path = _write(tmp_path, "optimizer: {lrr: 0.1}\n")
    with pytest.raises(
        ConfigError,
        match=r"Unknown key 'optimizer.lrr' in .*recipe.yaml; did you mean 'optimizer.lr'\? "
        r"Valid keys of 'optimizer': name, lr, weight_decay, betas, eps, no_decay_norm_bias",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"Unknown key 'max_duraton' in the overrides; did you mean 'max_duration'\?"):
        load_config(_write(tmp_path, "{}\n", "empty.yaml"), ["max_duraton=5ba"])
    with pytest.raises(ConfigError, match=r"Unknown key 'coap.rank_ratio' .*did you mean 'coap.rank_ratio_conv'"):
        load_config(_write(tmp_path, "coap: {rank_ratio: 4}\n", "c.yaml"))
    with pytest.raises(ConfigError, match=r"Unknown key 'zzz' in .*Valid keys of the top level: trainer, name, model"):
        load_config(_write(tmp_path, "zzz: 1\n", "z.yaml"))


def test_wrong_types_name_the_key(tmp_path):
    path = _write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"Invalid data.batch_size: Value 'abc' .* Integer"):
        load_config(path, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"Invalid model in .*m.yaml: expected a mapping of keys, got 'resnet18'"):
        load_config(_write(tmp_path, "model: resnet18\n", "m.yaml"))
    with pytest.raises(ConfigError, match=r"Invalid override 'optimizer.lr' \(expected dotted.key=value"):
        load_config(path, ["optimizer.lr"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer=compser",
            r"Invalid trainer: 'compser' \(expected one of composer, lightning\); did you mean 'composer'\?",
        ),
        ("max_duration=10", r"Invalid max_duration: '10' \(expected a positive number of batches or epochs"),
        ("data.batch_size=0", r"Invalid data.batch_size: 0 \(must be >= 1\)"),
        ("coap.rank_ratio_conv=0.5", r"Invalid coap.rank_ratio_conv: 0.5 \(must be a finite number >= 1, or None\)"),
        (
            "coap.basis_alignment=flip",
            r"Invalid coap.basis_alignment: 'flip' \(expected 'none', 'sign' or 'rotation'\)",
        ),
        ("coap.correlation_loss=mse", r"Invalid coap.correlation_loss: 'mse' \(expected 'paper' or 'relative'\)"),
        ("optimizer.betas=[0.9]", r"Invalid optimizer.betas: \[0.9\] \(expected two numbers in \[0, 1\)\)"),
        ("task.name=ddpm", r"Invalid model.name / task.name: 'resnet18' with 'ddpm'"),
        ("data.name=cifar10", r"Missing data.path for data.name 'cifar10'"),
        ("schedule.warmup=1ep", r"Invalid schedule.warmup: '1ep' \(give batches"),
        ("precision=fp8", r"Invalid precision: 'fp8' \(expected one of fp32, bf16, fp16\)"),
        ("data.augment=flip", r"Invalid data.augment: 'flip' \(expected one of none, crop, crop_flip\)"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    path = _write(tmp_path, "coap: {}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_missing_and_circular_recipes(tmp_path):
    with pytest.raises(FileNotFoundError, match="Recipe not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"Recipe not found: .*gone.yaml \(the base of .*child.yaml\)"):
        load_config(_write(tmp_path, "base: gone.yaml\n", "child.yaml"))
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="is its own base"):
        load_config(tmp_path / "a.yaml")


def test_cli_reports_config_errors_before_anything_runs(tmp_path, capsys):
    path = _write(tmp_path, "optimizer: {lrr: 0.1}\n")
    assert main([str(path)]) == 2
    assert "coap-train: error: Unknown key 'optimizer.lrr'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "coap-train: error: Recipe not found" in capsys.readouterr().err
    assert main([]) == 2
    assert "usage: coap-train CONFIG.yaml" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, key, shown",
    [
        ("optimizer.lr=nan", "optimizer.lr", "nan"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay", "inf"),
        ("optimizer.eps=-inf", "optimizer.eps", "-inf"),
        ("optimizer.betas=[0.9,nan]", "optimizer.betas", "[0.9, nan]"),
        ("schedule.min_lr_ratio=nan", "schedule.min_lr_ratio", "nan"),
        ("task.label_smoothing=inf", "task.label_smoothing", "inf"),
        ("task.beta_end=nan", "task.beta_end", "nan"),
        ("coap.rank_ratio_matrix=inf", "coap.rank_ratio_matrix", "inf"),
        ("coap.rank_ratio_conv=nan", "coap.rank_ratio_conv", "nan"),
        ("coap.rank_ratio_cnn=inf", "coap.rank_ratio_cnn", "inf"),
        ("model.kwargs={drop_rate: .nan}", "model.kwargs.drop_rate", "nan"),
    ],
)
def test_nonfinite_floats_are_refused_before_anything_runs(tmp_path, capsys, override, key, shown):
    path = _write(tmp_path, "coap: {}\n")
    assert main([str(path), override]) == 2
    err = capsys.readouterr().err
    plural = "finite numbers" if shown.startswith("[") else "a finite number"
    assert err == f"coap-train: error: Invalid {key}: {shown} (must be {plural})\n"
    assert not (tmp_path / "runs").exists()


def test_rank_ratio_cnn_is_an_alias_of_rank_ratio_conv(tmp_path):
    cfg = load_config(_write(tmp_path, "coap: {rank_ratio_cnn: 4}\n"))
    assert cfg.coap.rank_ratio_conv == 4.0 and cfg.coap.rank_ratio_cnn is None
    same = load_config(_write(tmp_path, "coap: {rank_ratio_cnn: 2, rank_ratio_conv: 2}\n", "same.yaml"))
    assert same.coap == load_config(_write(tmp_path, "coap: {rank_ratio_conv: 2}\n", "conv.yaml")).coap
    with pytest.raises(
        ConfigError,
        match=r"^Invalid coap.rank_ratio_cnn: 2.0 with coap.rank_ratio_conv: 4.0 "
        r"\(rank_ratio_cnn is an alias of rank_ratio_conv: give one of them\)$",
    ):
        load_config(_write(tmp_path, "coap: {rank_ratio_cnn: 2, rank_ratio_conv: 4}\n", "both.yaml"))
    with pytest.raises(
        ConfigError, match=r"^Invalid coap.rank_ratio_cnn: 0.5 \(must be a (finite )?number >= 1, or None\)$"
    ):
        load_config(tmp_path / "recipe.yaml", ["coap.rank_ratio_cnn=0.5"])
    from coap_plugins.train.common import coap_kwargs

    assert coap_kwargs(cfg.coap)["rank_ratio_conv"] == 4.0 and "rank_ratio_cnn" not in coap_kwargs(cfg.coap)


def test_parallelism_choices_and_what_fsdp2_does_not_combine_with_yet():
    recipe = YAMLS / "composer" / "resnet18_digits.yaml"
    assert load_config(recipe, ["parallelism=fsdp2"]).parallelism == "fsdp2"
    assert load_config(recipe).parallelism == "ddp"
    with pytest.raises(ConfigError, match=r"Invalid parallelism: 'fsdp' \(expected one of ddp, fsdp2\); did you mean"):
        load_config(recipe, ["parallelism=fsdp"])
    for override, key in (
        ("ema.decay=0.9", "ema"),
        ("clip_grad_norm=1.0", "clip_grad_norm"),
        ("compile=true", "compile"),
    ):
        with pytest.raises(ConfigError, match=rf"Invalid {key} with parallelism: fsdp2 \(not supported together yet\)"):
            load_config(recipe, ["parallelism=fsdp2", override])


def test_step_in_backward_setting_and_what_it_does_not_combine_with():
    recipe = YAMLS / "composer" / "resnet18_digits.yaml"
    cfg = load_config(recipe, ["coap.step_in_backward=true", "coap.backward_reduce=full"])
    assert cfg.coap.step_in_backward is True and cfg.coap.backward_reduce == "full"
    assert load_config(recipe).coap.step_in_backward is False
    with pytest.raises(ConfigError, match=r"Invalid coap.backward_reduce: 'half' \(expected 'projected' or 'full'\)"):
        load_config(recipe, ["coap.backward_reduce=half"])
    with pytest.raises(ConfigError, match=r"Invalid coap.step_in_backward: Value 'maybe' is not a valid bool"):
        load_config(recipe, ["coap.step_in_backward=maybe"])
    for override, key in (
        ("clip_grad_norm=1.0", "clip_grad_norm"),
        ("precision=fp16", "precision"),
        ("parallelism=fsdp2", "parallelism"),
    ):
        with pytest.raises(ConfigError, match=rf"Invalid {key} with coap.step_in_backward: true \("):
            load_config(recipe, ["coap.step_in_backward=true", override])
