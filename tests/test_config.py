import pytest

from qwen_cpt import ConfigError, CPTConfig

SPEC_FIELDS = [
    "model_name_or_path",
    "max_length",
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "use_muon_optimizer",
    "use_flash_attention",
    "use_gradient_checkpointing",
    "use_bf16",
    "output_dir",
    "max_samples",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "dataloader_num_workers",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "save_total_limit",
    "trust_remote_code",
    "wandb_project",
    "logging_dir",
    "max_steps",
    "seed",
    "lr_scheduler_type",
    "train_files",
    "eval_files",
    "eval_texts",
]


def test_spec_field_names_exist():
    cfg = CPTConfig(model_name_or_path="m")
    for name in SPEC_FIELDS:
        assert hasattr(cfg, name), name
    assert cfg.trust_remote_code is False
    assert cfg.resolved_logging_dir.endswith("logs")


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        CPTConfig(
            model_name_or_path="m",
            learning_rate=-1.0,
            per_device_train_batch_size=0,
            max_length=0,
            lr_scheduler_type="linear-ish",
        )
    msg = str(info.value)
    for name in ("learning_rate", "per_device_train_batch_size", "max_length", "lr_scheduler_type"):
        assert name in msg
    assert len(info.value.errors) == 4


def test_type_errors_name_field_and_value():
    with pytest.raises(ConfigError, match=r"max_length: expected int, got '2048'"):
        CPTConfig(model_name_or_path="m", max_length="2048")


def test_missing_model_path_is_an_error():
    with pytest.raises(ConfigError, match="model_name_or_path: required"):
        CPTConfig()


def test_yaml_round_trip_and_unknown_keys(tmp_path):
    cfg = CPTConfig(
        model_name_or_path="m",
        learning_rate=3e-5,
        train_files=["a.txt"],
        use_muon_optimizer=True,
        save_total_limit=None,
    )
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert CPTConfig.from_yaml(path) == cfg
    assert CPTConfig.from_yaml(path, {"max_length": 64}).max_length == 64
    path.write_text("model_name_or_path: m\nlearning_rat: 1e-4\n")
    with pytest.raises(
        ConfigError, match=r"learning_rat: unknown field \(did you mean learning_rate\?\)"
    ):
        CPTConfig.from_yaml(path)
    assert str(path) in str(pytest.raises(ConfigError, CPTConfig.from_yaml, path).value)


def test_int_given_for_float_field_is_accepted():
    assert CPTConfig(model_name_or_path="m", learning_rate=1).learning_rate == 1.0


def test_conflicting_options_are_reported():
    with pytest.raises(ConfigError) as info:
        CPTConfig(
            model_name_or_path="m",
            lr_scheduler_type="wsd",
            warmup_ratio=0.6,
            wsd_decay_ratio=0.5,
            output_dir="out",
            resume_from_checkpoint="out",
            nan_policy="ignore",
        )
    msg = str(info.value)
    assert "conflict" in msg and "points at output_dir itself" in msg and "nan_policy" in msg


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nlearning_rate: 5e-5\nweight_decay: 1e-2\n")
    cfg = CPTConfig.from_yaml(path)
    assert cfg.learning_rate == 5e-5 and cfg.weight_decay == 0.01
    path.write_text("model_name_or_path: m\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match="learning_rate: expected float or auto, got 'fast'"):
        CPTConfig.from_yaml(path)
