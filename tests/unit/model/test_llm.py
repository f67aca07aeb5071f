"""LLM loading: HF directories, frozen weights, dtype choice, clear errors."""

from __future__ import annotations

import pytest
import torch

from model.errors import LLMLoadError
from model.llm import load_llm, pick_dtype
from server.engine_decode import GQA_SDPA


def test_tiny_llm_is_frozen_and_in_eval(tiny_llm):
    assert not tiny_llm.model.training
    assert not any(p.requires_grad for p in tiny_llm.model.parameters())
    # the loader picks SDPA; a worker that already ran on this shared (session) model has
    # switched it to its own form of SDPA, which gives the same results
    assert tiny_llm.model.config._attn_implementation in ("sdpa", GQA_SDPA)


def test_identity_is_stable_and_distinguishes_weights(tiny_llm, tiny_llama2_dir):
    other = load_llm(str(tiny_llama2_dir))
    assert tiny_llm.identity == load_llm(tiny_llm.model.name_or_path).identity
    assert tiny_llm.identity.hidden_size == other.identity.hidden_size == 64
    # both tiny models come from seed 0, so their tables match; renaming does not matter
    assert tiny_llm.identity.embed_hash == other.identity.embed_hash


def test_bf16_on_cpu_by_choice(tiny_llm_dir, tiny_llm):
    llm = load_llm(str(tiny_llm_dir), dtype="bfloat16")
    assert llm.dtype == torch.bfloat16
    # an encoder aligned on a bf16 GPU loads against the float32 CPU model and back
    assert llm.identity == tiny_llm.identity
    assert pick_dtype(torch.device("cpu"), None) == torch.float32
    assert pick_dtype(torch.device("cuda"), None) == torch.bfloat16


@pytest.mark.parametrize("spec", ["/nonexistent/model", "meta-llama/Llama-2-7b-chat-hf"])
def test_unknown_specs_fail_clearly(spec):
    with pytest.raises(LLMLoadError, match="neither 'default'"):
        load_llm(spec)


def test_model_without_chat_template_is_refused(tmp_path, tiny_llm_dir):
    import shutil

    shutil.copytree(tiny_llm_dir, tmp_path / "m")
    for name in ("chat_template.jinja",):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    cfg = tmp_path / "m" / "tokenizer_config.json"
    import json

    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    with pytest.raises(LLMLoadError, match="chat template"):
        load_llm(str(tmp_path / "m"))
