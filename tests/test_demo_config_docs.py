"""The configuration reference is generated from the dataclasses' help texts."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from transformers import TrainingArguments

from flywheel.engine.config import EngineConfig
from flywheel.trainer.grpo_config import GRPOConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_config_docs.py"


@pytest.fixture(scope="module")
def gen_config_docs():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_lists_what_flywheel_adds_with_its_help(gen_config_docs):
    page = gen_config_docs.render()

    grpo_section = page.split("## GRPOConfig", 1)[1].split("\n## ", 1)[0]
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    for field in dataclasses.fields(GRPOConfig):
        if field.name not in inherited:
            assert f"| `{field.name}` |" in grpo_section
            assert " ".join(field.metadata["help"].split())[:40] in grpo_section
    assert "| `per_device_eval_batch_size` |" not in grpo_section
    assert "TrainingArguments' default: `5e-05`" in grpo_section  # learning_rate's changed default
    assert "## EngineConfig" in page
    for field in dataclasses.fields(EngineConfig):
        assert f"| `{field.name}` |" in page


def test_field_without_help_is_refused(gen_config_docs):
    @dataclasses.dataclass
    class Options:
        size: int = 1

    with pytest.raises(ValueError, match="Options.size has no help text"):
        gen_config_docs.class_section(Options, "`Options()`")


def test_check_mode_finds_a_stale_page(gen_config_docs, tmp_path):
    page = tmp_path / "configuration.md"
    assert gen_config_docs.main(["--output", str(page)]) == 0
    assert gen_config_docs.main(["--check", "--output", str(page)]) == 0
    page.write_text(page.read_text() + "hand edit\n")
    assert gen_config_docs.main(["--check", "--output", str(page)]) == 1


def test_committed_page_is_up_to_date(gen_config_docs):
    committed = (SCRIPT.parent.parent / "docs" / "configuration.md").read_text()
    assert committed == gen_config_docs.render(), "run `python scripts/gen_config_docs.py` to regenerate docs/configuration.md"
