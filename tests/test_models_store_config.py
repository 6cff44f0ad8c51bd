"""Model/tokenizer adapters, the crash-safe store and config validation."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

from self_rewarding_lm_pytorch.config import ConfigError, from_dict
from self_rewarding_lm_pytorch.models import CallableTokenizer, CausalLM, unwrap_model, wrap_model
from self_rewarding_lm_pytorch.store import JsonlStore, StoreError, atomic_write_json, read_jsonl


class Bigram(nn.Module):
    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.emb(x)


def test_plain_module_adapter_checks_shapes_and_range():
    lm = wrap_model(Bigram(), max_seq_len=8)
    assert lm.kind == "plain" and unwrap_model(lm) is lm.module
    out = lm(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 11)
    with pytest.raises(ValueError, match="exceeds the model's context of 8"):
        lm(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        lm(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        lm(torch.zeros(3, dtype=torch.long))
    lm.vocab_size = 11
    with pytest.raises(ValueError, match="negative pad id"):
        lm(torch.tensor([[1, -1]]))


def test_adapter_rejects_bad_model_outputs():
    class Flat(nn.Module):
        def forward(self, x):
            return x.float().sum(-1)

    with pytest.raises(ValueError, match="must map token ids"):
        CausalLM(Flat())(torch.ones(2, 3, dtype=torch.long))


def test_kinds_detected():
    from transformers import LlamaConfig, LlamaForCausalLM
    from x_transformers import Decoder, TransformerWrapper

    xt = TransformerWrapper(
        num_tokens=32, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2)
    )
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    hf = LlamaForCausalLM(cfg)
    a, b = wrap_model(xt), wrap_model(hf)
    assert (a.kind, a.max_seq_len, a.vocab_size) == ("xtransformers", 16, 32)
    assert (b.kind, b.max_seq_len, b.vocab_size) == ("hf", 64, 32)
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # with right padding, real positions do not depend on the pad
    torch.testing.assert_close(b(ids, mask)[:, :3], b(ids[:, :3])[:, :3])


def test_callable_tokenizer_accepts_seed_float_tensors():
    tok = CallableTokenizer(
        lambda s: torch.Tensor([ord(c) for c in s]), lambda t: "".join(chr(int(i)) for i in t)
    )
    assert tok.encode("ab") == [97, 98]
    assert tok.decode([97, 98]) == "ab"
    bad = CallableTokenizer(lambda s: torch.tensor([0.5]), str)
    with pytest.raises(ValueError, match="non-integer"):
        bad.encode("x")


def test_jsonl_store_dedups_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    store = JsonlStore(path)
    assert store.extend([{"id": "a", "v": 1}, {"id": "b", "v": 2}, {"id": "a", "v": 3}]) == 2
    assert not store.append({"id": "b", "v": 9})
    with open(path, "a") as f:  # a crash mid-write leaves a torn last line
        f.write('{"id": "c", "v"')
    reopened = JsonlStore(path)
    assert [r["id"] for r in reopened] == ["a", "b"] and "c" not in reopened
    reopened.append({"id": "c", "v": 3})
    assert [r["v"] for r in read_jsonl(path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="'id'"):
        reopened.append({"v": 1})


def test_atomic_write_json_and_unwritable_dir(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"x": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left behind
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        target = tmp_path / "s.json" / "x.json"
    else:
        target = ro / "x.json"
    with pytest.raises(StoreError, match="cannot write"):
        atomic_write_json(target, {})


@dataclasses.dataclass
class Inner:
    beta: float = 0.1
    mode: str = "mean"


@dataclasses.dataclass
class Outer:
    steps: int = 1
    inner: Inner = dataclasses.field(default_factory=Inner)
    names: list[str] = dataclasses.field(default_factory=list)


def test_config_validation_names_key_type_and_closest_match():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"beta": 1}, "names": ["a"]})
    assert cfg.steps == 3 and cfg.inner.beta == 1.0 and isinstance(cfg.inner.beta, float)
    with pytest.raises(ConfigError, match=r"unknown key 'inner.bta'; did you mean 'beta'"):
        from_dict(Outer, {"inner": {"bta": 1}})
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got str"):
        from_dict(Outer, {"steps": "3"})
    with pytest.raises(ConfigError, match=r"names\[1\]: expected a string"):
        from_dict(Outer, {"names": ["a", 2]})


def test_a_read_only_store_leaves_a_torn_line_to_the_writer(tmp_path):
    from self_rewarding_lm_pytorch.store import JsonlStore

    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "x"')  # torn by a crash
    reader = JsonlStore(path, repair=False)  # another rank of the launch
    assert [r["id"] for r in reader] == ["a", "b"]
    assert path.read_bytes().endswith(b'"x"')  # untouched: only the writer repairs
    with pytest.raises(RuntimeError, match="read-only"):
        reader.append({"id": "d"})
    writer = JsonlStore(path)
    assert writer.append({"id": "d"}) and [r["id"] for r in JsonlStore(path)] == ["a", "b", "d"]


def test_records_file_with_invalid_utf8_names_file_and_line(tmp_path):
    from self_rewarding_lm_pytorch.store import read_jsonl

    path = tmp_path / "candidates.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"candidates\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_jsonl(path)
