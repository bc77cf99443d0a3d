from pathlib import Path

import pytest
import yaml

from hhdpo.core.config import Config, ConfigError, config_yaml, load_config, save_config

SEED = Path(__file__).parents[1] / "data" / "seed_config.yaml"


def test_seed_config_loads_unchanged():
    cfg = load_config(SEED, ["policy_model=smollm2", "ref_model=smollm2"])
    assert cfg.dpo_training.learning_rate == pytest.approx(5e-7)  # YAML 1.1 reads 5e-7 as a string
    assert cfg.tail_test.lambda_ == 0.1 and cfg.tail_test.delta == 0.05
    assert cfg.HH_test.HH_test_policy_out == "eval_outputs/policy_out.jsonl"
    assert cfg.dataset.subset == "train[:10%]" and cfg.precision == "bf16"
    assert cfg.huggingface.model_repo == "your-name/dpo_llama3_8b"
    # new sections take defaults
    assert cfg.checkpoint.resume == "auto" and cfg.wandb.mode == "disabled"


def test_repo_configs_load():
    for p in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        assert isinstance(load_config(p), Config), p


def test_overrides_typed():
    cfg = load_config(None, ["dpo_training.dpo_beta=0.25", "dataset.data_dirs=[harmless-base, helpful-base]",
                             "wandb.mode=offline", "dpo_training.save_dir=123", "HH_test.do_sample=false"])
    assert cfg.dpo_training.dpo_beta == 0.25
    assert cfg.dataset.data_dirs == ["harmless-base", "helpful-base"]
    assert cfg.dpo_training.save_dir == "123" and cfg.HH_test.do_sample is False


@pytest.mark.parametrize("override, needles", [
    ("dpo_training.dpo_bta=0.1", ["dpo_training.dpo_bta", "unknown", "did you mean dpo_training.dpo_beta"]),
    ("dpo_trainin.dpo_beta=0.1", ["dpo_trainin", "did you mean dpo_training"]),
    ("dpo_training.batch_size=abc", ["dpo_training.batch_size", "'abc'", "expected an integer"]),
    ("dpo_training.dpo_beta=-1", ["dpo_training.dpo_beta", "-1", "> 0"]),
    ("tail_test.lambda=2", ["tail_test.lambda", "(0, 1]"]),
    ("dataset.use_chat_template=maybe", ["dataset.use_chat_template", "true or false"]),
    ("dpo_training.loss_type=kto", ["dpo_training.loss_type", "kto", "sigmoid"]),
    ("dataset=5", ["dataset", "mapping"]),
])
def test_bad_values_name_the_key(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(SEED, [override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("dpo_training:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_roundtrips_and_has_no_secret(tmp_path, monkeypatch):
    secret = "sk-test-SECRET-9f8e7d"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    cfg = load_config(SEED, ["policy_model=smollm2", f"judge.base_url=http://user:{secret}@127.0.0.1:9/v1"])
    path = save_config(cfg, tmp_path)
    text = path.read_text()
    assert secret not in text and "***" in text
    again = load_config(path)
    assert again.dpo_training == cfg.dpo_training and again.tail_test == cfg.tail_test
    assert yaml.safe_load(config_yaml(cfg))["tail_test"]["lambda"] == 0.1


def test_save_config_keeps_a_changed_previous_config(tmp_path):
    logged = []
    first = save_config(load_config(SEED, ["policy_model=smollm2"]), tmp_path, "eval_config.yaml", log=logged.append)
    save_config(load_config(SEED, ["policy_model=smollm2"]), tmp_path, "eval_config.yaml", log=logged.append)
    assert logged == [] and [p.name for p in tmp_path.iterdir()] == ["eval_config.yaml"]  # unchanged: nothing kept
    save_config(load_config(SEED, ["policy_model=smollm2", "dpo_training.dpo_beta=0.05"]), tmp_path, "eval_config.yaml",
                previous_tag="before", log=logged.append)
    assert load_config(tmp_path / "eval_config.before.yaml").dpo_training.dpo_beta == 0.1
    assert load_config(first).dpo_training.dpo_beta == 0.05
    assert len(logged) == 1 and "dpo_training.dpo_beta: 0.1 -> 0.05" in logged[0]


def test_readme_config_reference_is_current():
    from hhdpo.core.config import config_reference

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert config_reference() in readme, "regenerate the README's config reference from hhdpo.core.config.config_reference()"


def test_average_log_prob_auto_resolves_by_loss_type_and_is_saved_resolved(tmp_path):
    assert load_config(None).dpo_training.average_log_prob is False
    ipo = load_config(None, ["dpo_training.loss_type=ipo"])
    assert ipo.dpo_training.average_log_prob is True
    assert load_config(None, ["dpo_training.loss_type=ipo", "dpo_training.average_log_prob=false"]).dpo_training.average_log_prob is False
    assert load_config(None, ["dpo_training.average_log_prob=true"]).dpo_training.average_log_prob is True
    saved = yaml.safe_load(save_config(ipo, tmp_path).read_text())
    assert saved["dpo_training"]["average_log_prob"] is True


@pytest.mark.parametrize("precision, fsdp, refused", [
    ("bf16", "false", True), ("bf16", "null", False), ("bf16", "true", False),
    ("fp32", "false", False), ("auto", "false", False),  # auto: decided by the trainer on the device it finds
])
def test_fsdp_off_with_bf16_is_refused_at_load(precision, fsdp, refused):
    overrides = [f"precision={precision}", f"dpo_training.fsdp={fsdp}"]
    if not refused:
        assert load_config(SEED, overrides).precision == precision
        return
    with pytest.raises(ConfigError) as e:
        load_config(SEED, overrides)
    assert str(e.value).startswith("dpo_training.fsdp: got False, expected true or null with precision: bf16"), str(e.value)
