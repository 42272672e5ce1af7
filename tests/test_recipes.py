"""Recipes: the paper's settings as named presets, in Python and with ``--recipe`` on the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
from pathlib import Path

import pytest

import skipvlm
from skipvlm.cli import main
from skipvlm.recipes import RECIPES, recipe_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipes_hold_the_official_settings_and_name_every_source():
    assert skipvlm.recipe_names() == ["lavin", "llava-1.5"]
    llava = skipvlm.get_recipe("llava-1.5")
    assert (llava.eas.replace_dim, llava.eas.adapt_dim, llava.eas.dropout) == (256, 128, 0.1)
    assert llava.eas.train_projector and (llava.train.lr, llava.search.train.lr) == (4e-4, 2e-4)
    assert (llava.search.interval, llava.search.n_candidates) == (3, 5)
    lavin = skipvlm.get_recipe("lavin")
    assert (lavin.eas.replace_dim, lavin.eas.adapt_dim, lavin.eas.dropout) == (32, 8, 0.1)
    assert lavin.train.lr == pytest.approx(9e-3 * 32 / 256) and lavin.train.grad_accum == 4
    assert (lavin.search.warmup_epochs, lavin.search.search_epochs, lavin.search.interval) == (5, 5, 10)
    for recipe in (llava, lavin):
        # every setting a recipe changes says where its value comes from; no recipe skips anything
        assert set(recipe.settings()) <= set(recipe.sources), recipe.name
        assert recipe.eas.plan().is_empty and not recipe.eas.supernet
        # the PIA switches stay at the spec's values
        assert recipe.eas.freeze_pooled and recipe.eas.info_exchange and recipe.eas.mlp_replace == "none"


def test_get_recipe_returns_a_copy_and_names_the_choices():
    recipe = skipvlm.get_recipe("lavin")
    recipe.eas.dropout = 0.3
    recipe.search.train.lr = 1.0
    assert skipvlm.get_recipe("lavin").eas.dropout == 0.1
    assert RECIPES["lavin"].search.train.lr != 1.0
    with pytest.raises(ValueError, match=r"unknown recipe 'llava'; choose one of \['lavin', 'llava-1.5'\]"):
        skipvlm.get_recipe("llava")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "mine"


def test_readme_shows_the_recipe_table_as_the_code_defines_it():
    assert recipe_table() in README.read_text()


def _spy(monkeypatch, name: str, result) -> dict:
    """Replace ``skipvlm.train.<name>`` (the module's, which the CLI imports) by a recorder."""
    seen = {}

    def record(model, batches, *args, **kwargs):
        seen.update(kwargs, args=args)
        return result

    monkeypatch.setattr(importlib.import_module("skipvlm.train"), name, record)
    return seen


def test_train_recipe_and_explicit_options_override_it(toy_dir, tmp_path, monkeypatch, capsys):
    done = types.SimpleNamespace(trainable_parameters=lambda: (1, 2), plan=skipvlm.Plan())
    seen = _spy(monkeypatch, "train", done)
    args = ["train", "--model", str(toy_dir / "model"), "--train", str(toy_dir / "train.jsonl")]
    args += ["--out", str(tmp_path), "--skip-attention", "1", "--recipe", "llava-1.5"]
    assert main([*args, "--lr", "0.01", "--dropout", "0.2", "--no-train-projector"]) == 0, capsys.readouterr()
    config, eas = seen["args"][0], seen["eas"]
    recipe = skipvlm.get_recipe("llava-1.5")
    assert config == dataclasses.replace(recipe.train, lr=0.01)  # the rest is the recipe's
    assert eas == dataclasses.replace(recipe.eas, skip_attention=[1], dropout=0.2, train_projector=False)


def test_search_recipe_and_explicit_options_override_it(toy_dir, tmp_path, monkeypatch, capsys):
    seen = _spy(monkeypatch, "search", types.SimpleNamespace(arms=[0, 1]))
    args = ["search", "--model", str(toy_dir / "model"), "--train", str(toy_dir / "train.jsonl")]
    args += ["--heldout", str(toy_dir / "heldout.jsonl"), "--out", str(tmp_path), "--recipe", "lavin"]
    options = ["--k", "2", "--warmup-epochs", "1", "--search-epochs", "1", "--interval", "2"]
    assert main([*args, *options, "--weight-decay", "0.5", "--single-path"]) == 0, capsys.readouterr()
    config, eas = seen["args"][1], seen["eas"]  # search(model, batches, heldout, config, eas=...)
    recipe = skipvlm.get_recipe("lavin")
    train = dataclasses.replace(recipe.search.train, weight_decay=0.5)
    assert config == dataclasses.replace(
        recipe.search, k=2, warmup_epochs=1, search_epochs=1, interval=2, train=train
    )
    assert eas == dataclasses.replace(recipe.eas, single_path=True)


def test_an_unknown_recipe_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "m", "--train", "t", "--out", "o", "--recipe", "nope"])
    assert re.search(r"invalid choice: 'nope'", capsys.readouterr().err)
