from mlfm_scale.redact import REDACTED, redact, redact_text


def test_secret_looking_keys_and_assignments_are_redacted():
    config = {"api_key": "s1", "nested": {"HF_TOKEN": "s2", "db_password": "s3", "steps": 4, "unset_key": None},
              "launch": {"setup": ["export WANDB_API_KEY=s4", "module load cuda", 'MY_SECRET="s 5" run',
                                   "export PATH=/opt/bin"]},
              "data": {"prep": {"eos_token": "</s>", "tokenizer": "data/tokenizer"}}}
    out = redact(config)
    assert out["api_key"] == out["nested"]["HF_TOKEN"] == out["nested"]["db_password"] == REDACTED
    assert out["nested"]["steps"] == 4 and out["nested"]["unset_key"] is None
    assert out["launch"]["setup"] == [f"export WANDB_API_KEY={REDACTED}", "module load cuda",
                                      f"MY_SECRET={REDACTED} run", "export PATH=/opt/bin"]
    assert out["data"] == config["data"]  # vocabulary and tokenizer settings are not credentials
    assert config["api_key"] == "s1"  # a copy
    assert redact_text("TOKEN=abc python x.py KEY_ID='q r'") == f"TOKEN={REDACTED} python x.py KEY_ID={REDACTED}"
