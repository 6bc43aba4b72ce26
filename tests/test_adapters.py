"""Adapter folders: atomic publishing, verification, and refusal of corrupt or foreign adapters."""

from __future__ import annotations

import json

import pytest
import torch

from playground.serving.adapters import (
    AdapterError,
    check_files,
    clean_temporary,
    load_version,
    merged_model,
    publish,
)


def lora_writer(model, seed=0, scale=0.05):
    """A writer that saves a LoRA adapter with non-zero B (so it changes the model's outputs)."""
    import copy

    from peft import LoraConfig, get_peft_model

    def write(folder):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, scale)
        peft_model.save_pretrained(folder)

    return write


def manifest(model_id):
    return {"base_model_id": model_id, "parent": "v0", "algo": "dpo"}


def test_publish_writes_a_verified_version_atomically(tiny_loaded, tmp_path):
    folder = publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest(tiny_loaded.model_id))
    assert folder == tmp_path / "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # no temporary folder left
    written = check_files(folder, tiny_loaded.model_id)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(written["files"])
    with pytest.raises(AdapterError, match="already exists"):
        publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest(tiny_loaded.model_id))


def test_a_version_failing_verification_is_never_put_in_place(tiny_loaded, tmp_path):
    def refuse(folder):
        raise AdapterError("non-finite logits")

    with pytest.raises(AdapterError):
        publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest(tiny_loaded.model_id), verify=refuse)
    assert list(tmp_path.iterdir()) == []


def test_merged_model_changes_outputs_and_leaves_the_base_alone(tiny_loaded, tmp_path):
    base = tiny_loaded.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    folder = publish(tmp_path, "v1", lora_writer(base), manifest(tiny_loaded.model_id))
    _, merged = load_version(base, folder, tiny_loaded.model_id)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:100]), "does not match its hash"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "corrupt"),
    (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    (lambda f: (f / "adapter_config.json").unlink(), "missing"),
])
def test_corrupt_or_truncated_adapters_are_refused(tiny_loaded, tmp_path, damage, message):
    folder = publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest(tiny_loaded.model_id))
    damage(folder)
    with pytest.raises(AdapterError, match=message):
        load_version(tiny_loaded.model, folder, tiny_loaded.model_id)


def test_an_adapter_for_another_base_model_is_refused(tiny_loaded, tmp_path):
    folder = publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest("some-other-model"))
    with pytest.raises(AdapterError, match="trained on 'some-other-model'"):
        load_version(tiny_loaded.model, folder, tiny_loaded.model_id)


def test_an_adapter_whose_shapes_do_not_fit_is_refused(tiny_loaded, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_loaded.model.config.vocab_size, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1))
    # Claims the right base model id, but its tensors are for a different architecture.
    folder = publish(tmp_path, "v1", lora_writer(other), manifest(tiny_loaded.model_id))
    with pytest.raises(AdapterError, match="does not load"):
        merged_model(tiny_loaded.model, folder)


def test_half_written_folders_are_cleaned(tmp_path):
    (tmp_path / ".tmp-v3-abcd").mkdir()
    (tmp_path / ".tmp-v3-abcd" / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / "v2").mkdir()
    assert clean_temporary(tmp_path) == [".tmp-v3-abcd"]
    assert [p.name for p in tmp_path.iterdir()] == ["v2"]


def test_manifest_records_every_file_hash(tiny_loaded, tmp_path):
    folder = publish(tmp_path, "v1", lora_writer(tiny_loaded.model), manifest(tiny_loaded.model_id))
    data = json.loads((folder / "manifest.json").read_text())
    assert data["name"] == "v1" and data["parent"] == "v0" and len(data["files"]["adapter_model.safetensors"]) == 64
