import dataclasses
import warnings

import pytest

from dantinox_eqx.config import Config, ConfigError


def test_defaults_match_the_original():
    c = Config()
    assert (c.dim, c.n_heads, c.head_size, c.num_blocks, c.max_context) == (512, 16, 32, 12, 512)
    assert (c.lr, c.batch_size, c.grad_clip, c.warmup_steps, c.eval_interval) == (3e-4, 32, 1.0, 400, 50)
    assert c.lr_schedule == "cosine" and c.optimizer == "adamw" and c.tokenizer_type == "char"
    assert c.effective_kv_heads == 16


def test_mutation_points_to_replace():
    c = Config()
    with pytest.raises(ConfigError, match=r"replace\(use_lora=True\)"):
        c.use_lora = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    d = c.replace(use_lora=True, lora_rank=4)
    assert d.use_lora and d.lora_rank == 4 and not c.use_lora


@pytest.mark.parametrize("kwargs, field", [
    (dict(dimm=64), "dimm"),
    (dict(dim="big"), "dim"),
    (dict(use_bf16="yes"), "use_bf16"),
    (dict(dim=100), "dim"),
    (dict(kv_heads=3), "kv_heads"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr_schedule="cosin"), "lr_schedule"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(tokenizer_type="word"), "tokenizer_type"),
    (dict(dropout_rate=1.5), "dropout_rate"),
    (dict(n_devices=5), "batch_size"),
    (dict(loss_chunk=-2), "loss_chunk"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        Config(**kwargs)
    assert field in str(err.value)


def test_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'max_context'"):
        Config.from_dict({"max_contxt": 8})


def test_yaml_round_trip_and_sections(tmp_path):
    c = Config(dim=64, n_heads=4, head_size=16, lr=1e-3, max_steps=10, kv_heads=2)
    p = tmp_path / "c.yaml"
    c.to_yaml(p)
    assert Config.from_yaml(p) == c
    sectioned = tmp_path / "s.yaml"
    sectioned.write_text("model:\n  dim: 64\n  n_heads: 4\n  head_size: 16\n"
                         "training:\n  lr: 1e-3\n  max_steps: 10\nattention:\n  kv_heads: 2\n")
    assert Config.from_yaml(sectioned) == c


def test_field_in_two_sections_is_an_error():
    with pytest.raises(ConfigError, match="lr: set twice"):
        Config.from_dict({"training": {"lr": 1e-3}, "model": {"lr": 1e-4}})


def test_out_of_scope_fields_warn_and_load():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = Config.from_dict({"model": {"diffusion_steps": 10, "use_flash_attention": True, "dim": 512}})
    assert c.dim == 512 and any("diffusion_steps" in str(x.message) for x in w)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    c = Config.from_yaml(root / "configs" / "default_config.yaml")
    assert c.tokenizer_type == "char"
    import yaml

    sweep = yaml.safe_load((root / "configs" / "sweep.yaml").read_text())
    assert sweep["method"] == "bayes" and "lr" in sweep["parameters"]


def test_recipe_is_the_default_config_with_the_measured_muon_settings():
    """configs/recipe.yaml is what benchmarks/README.md measured (Muon, muon_lr 0.01, 800 steps:
    AdamW's final val loss in 40 % of its steps) on the default shape: nothing else differs."""
    from dataclasses import asdict
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    default = asdict(Config.from_yaml(root / "configs" / "default_config.yaml"))
    recipe = asdict(Config.from_yaml(root / "configs" / "recipe.yaml"))
    changed = {k: recipe[k] for k in recipe if recipe[k] != default[k]}
    assert changed == {"optimizer": "muon", "max_steps": 800} and recipe["muon_lr"] == 0.01


def test_cli_coercion():
    assert Config.coerce("use_bf16", "True") is True
    assert Config.coerce("lr", "3e-4") == 3e-4
    assert Config.coerce("max_steps", "None") is None
    with pytest.raises(ConfigError, match="num_blocks"):
        Config.coerce("num_blocks", "four")


def test_total_steps_from_epochs():
    c = Config(batch_size=4, max_context=8, epochs=2.0)
    assert c.total_steps(n_train_tokens=320) == 20
    assert c.replace(max_steps=7).total_steps(320) == 7


def test_loads_a_config_written_by_dantinox_0_4_14():
    """tests/data holds Config().save_yaml() output of the original (pip dantinox==0.4.14)."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "dantinox_0.4.14_default.yaml"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = Config.from_yaml(path)
    # same names and defaults for everything in our scope (it stores kv_heads resolved to n_heads)
    assert c.kv_heads == 16 and c.replace(kv_heads=None) == Config()
    assert any("diffusion_steps" in str(x.message) for x in w)


def test_scan_unroll_auto_unrolls_shallow_models_only():
    from dantinox_eqx.config import AUTO_UNROLL_MAX_BLOCKS

    assert Config(num_blocks=4).effective_scan_unroll == 4
    assert Config(num_blocks=AUTO_UNROLL_MAX_BLOCKS).effective_scan_unroll == AUTO_UNROLL_MAX_BLOCKS
    assert Config(num_blocks=AUTO_UNROLL_MAX_BLOCKS + 1).effective_scan_unroll == 1
    assert Config(num_blocks=16, scan_unroll=2).effective_scan_unroll == 2
    assert Config(num_blocks=4, sharding="fsdp").effective_scan_unroll == 1  # one layer gathered at a time
    with pytest.raises(ConfigError, match="scan_unroll"):
        Config(scan_unroll=-1)
