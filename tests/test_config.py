"""The configuration contract: one typed schema, every problem at once, exit 2, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env, run_train, train_cmd
from tuneserve.config import TRAIN_SCHEMA, load_train_config
from tuneserve.exitcodes import ConfigError, ExitCode


@pytest.fixture
def base_env(chatml_base, qa_dataset):
    return {"BASE_MODEL": str(chatml_base), "DATASET": str(qa_dataset)}


def test_help_lists_every_variable_with_default_and_help(tmp_path):
    out = subprocess.run(train_cmd("--help"), env=clean_env(), cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0
    for var in TRAIN_SCHEMA.vars:
        assert f"{var.name}  [{var.type}, default: {var.default_text()}]" in out.stdout
        assert var.help.split(" ")[0] in out.stdout
    for prefix in ("SFT_<FIELD>", "LORA_<FIELD>", "BNB_<FIELD>"):
        assert prefix in out.stdout
    for code in ExitCode:
        assert f"  {int(code):>3}  " in out.stdout


def test_config_errors_are_all_listed_exit_2_without_traceback_or_torch(tmp_path):
    # A child that loads the configuration the way the entrypoint does and reports whether torch got imported.
    probe = (
        "import sys\nfrom entrypoints.train import main\ncode = main([])\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\nsys.exit(code)\n"
    )
    env = clean_env(
        LORA_R="-4", PACKING="maybe", EVAL_SIZE="1.5", DATASET="./nope.jsonl", SFT_NOT_A_FIELD="1", DTYPE="fp8"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == ExitCode.CONFIG
    err = out.stderr
    assert "found 7 configuration problems" in err
    for expected in (
        "BASE_MODEL is required",
        "LORA_R='-4': must be >= 1",
        "PACKING='maybe': expected auto or a boolean",
        "EVAL_SIZE='1.5'",
        "DATASET='./nope.jsonl': no such file",
        "SFT_NOT_A_FIELD: SFT_* variables set fields of trl.SFTConfig, and it has no field 'not_a_field'",
        "DTYPE='fp8': expected one of auto, bfloat16, float16, float32",
    ):
        assert expected in err, expected
    assert "Traceback" not in err
    assert "TORCH_NOT_IMPORTED" in out.stdout


def test_passthrough_prefixes_convert_types_and_reject_unknown_or_managed(base_env):
    cfg = load_train_config(
        {
            **base_env,
            "SFT_WEIGHT_DECAY": "0.1",
            "SFT_DATASET_KWARGS": '{"add_special_tokens": false}',
            "LORA_USE_DORA": "true",
            "LORA_BIAS": "lora_only",
            "BNB_4BIT_QUANT_TYPE": "fp4",
            "BNB_LLM_INT8_THRESHOLD": "5",
            "BNB_CUDA_VERSION": "126",
        }
    )
    assert cfg.extras["sft"] == {"weight_decay": 0.1, "dataset_kwargs": {"add_special_tokens": False}}
    assert cfg.extras["lora"] == {"use_dora": True, "bias": "lora_only"}
    assert cfg.extras["bnb"] == {"bnb_4bit_quant_type": "fp4", "llm_int8_threshold": 5.0}

    with pytest.raises(ConfigError) as err:
        load_train_config(
            {
                **base_env,
                "SFT_HUB_TOKEN": "x",
                "SFT_MAX_LENGTH": "10",
                "LORA_USE_DORA": "perhaps",
                "SFT_DATASET_KWARGS": "{broken",
                "LORA_NOPE": "1",
            }
        )
    problems = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5
    assert "SFT_HUB_TOKEN: trl.SFTConfig.hub_token is set by this tool; the token is read from HF_TOKEN" in problems
    assert "SFT_MAX_LENGTH: trl.SFTConfig.max_length is set by this tool; use MAX_SEQ_LENGTH" in problems
    assert "LORA_USE_DORA='perhaps': expected bool" in problems
    assert "SFT_DATASET_KWARGS='{broken': invalid JSON" in problems
    assert "LORA_NOPE: LORA_* variables set fields of peft.LoraConfig, and it has no field 'nope'" in problems


def test_named_variables_parse_to_their_types(base_env):
    cfg = load_train_config(
        {
            **base_env,
            "LORA_TARGET_MODULES": "q_proj, v_proj",
            "EVAL_SIZE": "0.25",
            "MAX_SAMPLES": "100",
            "PACKING": "yes",
            "LEARNING_RATE": "1e-4",
            "LORA_MODULES_TO_SAVE": '["lm_head", "embed_tokens"]',
        }
    )
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.eval_size == 0.25 and cfg.max_samples == 100 and cfg.packing is True
    assert cfg.learning_rate == 1e-4 and cfg.lora_modules_to_save == ["lm_head", "embed_tokens"]
    assert load_train_config({**base_env, "EVAL_SIZE": "30"}).eval_size == 30
    cfg = load_train_config({**base_env, "USER_TEMPLATE": r"<SCHEMA>\n{ctx}\n</SCHEMA>\t{q}", "ASSISTANT_FIELD": "a"})
    assert cfg.user_template == "<SCHEMA>\n{ctx}\n</SCHEMA>\t{q}"
    defaults = load_train_config(base_env)
    assert defaults.load_in_4bit is True and defaults.lora_target_modules == ["all-linear"]
    assert defaults.output_dir == "./output" and defaults.assistant_only_loss is True


@pytest.mark.parametrize(
    "word,value",
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_booleans_parse_one_way(base_env, word, value):
    assert load_train_config({**base_env, "PACKING": word}).packing is value


def test_env_file_is_read_and_real_environment_wins(tmp_path, chatml_base, qa_dataset, monkeypatch):
    (tmp_path / ".env").write_text(f"BASE_MODEL={chatml_base}\nDATASET={qa_dataset}\nLORA_R=8\nSEED=7\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config({"SEED": "9"})
    assert cfg.base_model == str(chatml_base) and cfg.lora_r == 8 and cfg.seed == 9
    other = tmp_path / "other.env"
    other.write_text(f"BASE_MODEL={chatml_base}\nDATASET={qa_dataset}\nLORA_R=4\n")
    assert load_train_config({"ENV_FILE": str(other)}).lora_r == 4
    with pytest.raises(ConfigError, match="ENV_FILE='missing.env': no such file"):
        load_train_config({"ENV_FILE": "missing.env"})


def test_print_config_masks_secrets(tmp_path, base_env):
    secret = "hf_printcfgSECRET12345"
    out = run_train({**base_env, "HF_TOKEN": secret, "SFT_WEIGHT_DECAY": "0.01"}, "--print-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["HF_TOKEN"] == "***" and printed["SFT_WEIGHT_DECAY"] == 0.01
    assert printed["BASE_MODEL"] == base_env["BASE_MODEL"] and printed["LORA_R"] == 16
    assert secret not in out.stdout + out.stderr


def test_cross_field_rules(base_env, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_train_config(
            {
                **base_env,
                "EVAL_SPLIT": "test",
                "EVAL_SIZE": "10",
                "USER_TEMPLATE": "{q}",
                "CHAT_TEMPLATE": "nonexistent_name",
                "HF_TOKEN_FILE": str(tmp_path / "no-token"),
            }
        )
    problems = "\n".join(err.value.problems)
    assert "set one of them, not both" in problems
    assert "USER_TEMPLATE is set but ASSISTANT_FIELD is not" in problems
    assert "CHAT_TEMPLATE='nonexistent_name': not a known name" in problems
    assert "HF_TOKEN_FILE=" in problems


def test_passthrough_field_tables_match_installed_libraries():
    """passthrough_fields.json is what lets SFT_/LORA_/BNB_ be validated without importing torch; it must
    describe the pinned TRL, PEFT and transformers (regenerate: python -m tuneserve.passthrough)."""
    from tuneserve import passthrough

    assert passthrough.generate() == json.loads(passthrough.FIELDS_FILE.read_text())


def test_readme_text_to_sql_example_is_a_valid_configuration(tmp_path, monkeypatch):
    """The README's .env example loads as written and builds the guide's conversations."""
    import re

    readme = (REPO / "docs" / "training.md").read_text()
    section = readme.split("### Example: the text-to-SQL guide", 1)[1]
    env_text = re.search(r"```env\n(.*?)```", section, re.S).group(1)
    (tmp_path / ".env").write_text(env_text)
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config({})
    assert cfg.base_model == "google/gemma-3-1b-pt" and cfg.tokenizer == "google/gemma-3-1b-it"
    assert cfg.assistant_field == "sql" and cfg.eval_size == 2500 and cfg.max_samples == 10000
    assert cfg.lora_modules_to_save == ["lm_head", "embed_tokens"]
    row = {"sql_context": "CREATE TABLE t (a INT);", "sql_prompt": "How many rows?"}
    user = cfg.user_template.format(**row)
    assert "<SCHEMA>\nCREATE TABLE t (a INT);\n</SCHEMA>\n\n<USER_QUERY>\nHow many rows?\n</USER_QUERY>\n" in user
