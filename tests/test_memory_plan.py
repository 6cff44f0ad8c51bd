"""``srlm plan`` and ``memory_plan``: parameter counts, the ZeRO paper's byte accounting,
the activation formula, LoRA counts, the fits decision and the printed table, checked
against hand computations from the published Llama shapes (meta device: no weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from self_rewarding_lm_pytorch.cli import main
from self_rewarding_lm_pytorch.cli.plan import load_plan_config, model_shape
from self_rewarding_lm_pytorch.config import ConfigError, LoRAConfig
from self_rewarding_lm_pytorch.config.load import load_run_config
from self_rewarding_lm_pytorch.memory_plan import (
    GIB,
    fits,
    lora_trainable,
    model_states,
    plan,
    precision_for,
    run_phases,
    shape_from_hf,
    shape_from_xtransformers,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHAPES = EXAMPLES / "shapes"
LORA_1GPU = EXAMPLES / "recipe_8b_lora_1gpu.yaml"
FULL_8GPU = EXAMPLES / "recipe_8b_full_8gpu.yaml"


def _meta_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


@pytest.fixture(scope="module")
def shape8b():
    return shape_from_hf(SHAPES / "llama-3.1-8b")


@pytest.fixture(scope="module")
def c8b():
    return json.loads((SHAPES / "llama-3.1-8b" / "config.json").read_text())


def _hand_params(c: dict) -> int:
    """Embeddings + per layer (q, k, v, o with GQA, SwiGLU gate/up/down, 2 RMSNorms) +
    final norm + lm_head unless tied: from the config numbers alone."""
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim", h // c["num_attention_heads"])
    q = c["num_attention_heads"] * head_dim
    kv = c["num_key_value_heads"] * head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h + n * layer + h + (0 if c["tie_word_embeddings"] else v * h)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "llama-2-70b"])
def test_param_count_equals_hand_count_and_meta_model(name):
    folder = SHAPES / name
    c = json.loads((folder / "config.json").read_text())
    meta = sum(p.numel() for p in _meta_model(folder).parameters())
    assert shape_from_hf(folder).num_params == _hand_params(c) == meta


def test_model_state_bytes_follow_the_zero_paper(shape8b, c8b):
    """Rajbhandari et al. 2020: 2 + 2 + K bytes per parameter, K = 12 for mixed-precision
    Adam (fp32 master + m + v); ZeRO-2 partitions the 12 and the 2 of gradients, ZeRO-3
    also the 2 of weights. DDP keeps a bucket copy of the gradients on > 1 GPU; ZeRO-3
    gathers two layers' weights (16-bit) at a time."""
    psi = _hand_params(c8b)
    h, i = c8b["hidden_size"], c8b["intermediate_size"]
    kv = c8b["num_key_value_heads"] * c8b["head_dim"]
    layer_linear = 2 * h * h + 2 * h * kv + 3 * h * i
    for optimizer, k in (("adamw", 12), ("adamw8bit", 4 + 2)):  # 8-bit: master 4 + m, v 1+1
        prec = precision_for("bfloat16", "bf16", optimizer, lora=False)
        for n in (1, 8):
            hand = {
                "ddp": (2 * psi, 2 * psi, k * psi, 2 * psi if n > 1 else 0),
                "zero2": (2 * psi, 2 * psi // n, k * psi // n, 0),
                "zero3": (2 * psi // n, 2 * psi // n, k * psi // n,
                          2 * layer_linear * 2 if n > 1 else 0),
            }  # fmt: skip
            for strategy, (p, g, o, buf) in hand.items():
                st = model_states(shape8b, psi, prec, strategy, n)
                assert (st.params, st.grads, st.optimizer, st.buffers) == (p, g, o, buf)
                assert st.total == p + g + o + buf
    # fp32 weights under bf16 autocast: 4 + 4 + 8 plus a 2-byte copy of each weight
    st = model_states(shape8b, psi, precision_for("float32", "bf16", "adamw", lora=False), "ddp", 1)
    assert (st.params, st.grads, st.optimizer, st.buffers) == (4 * psi, 4 * psi, 8 * psi, 2 * psi)


def test_lora_r16_all_linear_equals_hand_count_and_peft(shape8b, c8b):
    from self_rewarding_lm_pytorch.hf import apply_lora

    h, i, n_layers = c8b["hidden_size"], c8b["intermediate_size"], c8b["num_hidden_layers"]
    kv = c8b["num_key_value_heads"] * c8b["head_dim"]
    r = 16
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert lora_trainable(shape8b, r, "all-linear") == n_layers * per_layer
    assert lora_trainable(shape8b, r, ["q_proj", "v_proj"]) == n_layers * r * (2 * h + h + kv)
    peft_model = apply_lora(_meta_model(SHAPES / "llama-3.1-8b"), LoRAConfig(r=r))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trained == n_layers * per_layer


def test_activations_follow_the_stated_formula(shape8b, c8b):
    """Per layer and token (Korthikanti et al. 2022 without dropout, flash attention, GQA,
    SwiGLU): 2h norms + h (qkv input) + q + 2 kv + q (attention output) + h (MLP input)
    + 4i; plus the final norm (2h) and logits with their gradient (2 V); 2 bytes (bf16)."""
    cfg = load_plan_config(LORA_1GPU)
    h, i, v = c8b["hidden_size"], c8b["intermediate_size"], c8b["vocab_size"]
    kv = c8b["num_key_value_heads"] * c8b["head_dim"]
    per_token = c8b["num_hidden_layers"] * (2 * h + h + h + 2 * kv + h + h + 4 * i) + 2 * h + 2 * v
    phases = run_phases(cfg, shape8b, precision_for("bfloat16", "bf16", "adamw", lora=True))
    sft = next(p for p in phases if p.stage.endswith("sft") and p.kind == "train")
    dpo = next(p for p in phases if p.stage.endswith("dpo") and p.kind == "train")
    sft_b, dpo_b = (s.trainer["batch_size"] for s in (cfg.stage_objects[0], cfg.stage_objects[2]))
    assert (sft.sequences, sft.seq_len) == (sft_b, 2048)
    assert sft.bytes == 2 * per_token * sft_b * 2048
    assert (dpo.sequences, dpo.seq_len) == (
        2 * dpo_b,
        cfg.preference_max_seq_len,
    )  # chosen+rejected
    ref = next(p for p in phases if p.kind == "reference")
    assert ref.sequences == 2 * (2 * dpo_b)  # ref_batch_size defaults to 2 x batch_size pairs
    kv_rows = cfg.stage_objects[2].chunk_size * cfg.stage_objects[2].num_candidates
    kv_phase = next(p for p in phases if p.kind == "sampling")
    assert kv_phase.bytes == kv_rows * cfg.preference_max_seq_len * 32 * 2 * kv * 2


def test_checkpointed_activations_are_layer_inputs_plus_one_layer(shape8b, c8b, capsys):
    """With a stage's trainer gradient_checkpointing: every layer keeps its input (h per
    token) and one layer's full set exists at a time (recomputed in the backward), plus
    the final norm and the logits as before; the plan's train column follows the stage."""
    h, i, v = c8b["hidden_size"], c8b["intermediate_size"], c8b["vocab_size"]
    kv, n = c8b["num_key_value_heads"] * c8b["head_dim"], c8b["num_hidden_layers"]
    layer = 2 * h + h + h + 2 * kv + h + h + 4 * i
    tokens = 4 * 2048
    with_ckpt = tokens * 2 * (n * h + layer + 2 * h + 2 * v)
    without = tokens * 2 * (n * layer + 2 * h + 2 * v)
    assert with_ckpt < without / 6  # 8B, 4 x 2048 tokens: 7.3 instead of 45 GiB
    overrides = ["stages.0.trainer.gradient_checkpointing=true"]
    cfg = load_plan_config(LORA_1GPU, overrides)
    prec = precision_for("bfloat16", "bf16", "adamw", lora=True)
    sft, dpo = (p for p in run_phases(cfg, shape8b, prec) if p.kind == "train")
    assert (sft.checkpointing, sft.bytes, sft.bytes_no_checkpointing) == (True, with_ckpt, without)
    assert (dpo.checkpointing, dpo.bytes, dpo.bytes_checkpointing) == (False, without, with_ckpt)
    both = ["stages.0.trainer.gradient_checkpointing=true"]
    both += ["stages.2.trainer.gradient_checkpointing=true", "stages.2.trainer.optimizer=adamw8bit"]
    cfg = load_plan_config(LORA_1GPU, both)
    phases = run_phases(cfg, shape8b, prec)
    assert [p.optimizer for p in phases if p.kind == "train"] == ["adamw", "adamw8bit"]
    rows = plan(shape8b, phases, model_dtype="bfloat16", mixed_precision="bf16",
                lora=(16, "all-linear"), gpus=[1], gpu_memory_gib=80)  # fmt: skip
    full = next(r for r in rows if (r.strategy, r.tuning, r.optimizer) == ("ddp", "full", "adamw"))
    assert full.train == full.params + full.grads + full.optimizer_state + with_ckpt
    assert main(["plan", str(LORA_1GPU), *both, "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    a, b = f"{with_ckpt / GIB:.1f}", f"{without / GIB:.1f}"
    assert f"| 3:self_reward_dpo | train | 4 | 2048 | adamw8bit | yes | {a} | {b} / {a} |" in out


def test_fits_flips_at_the_headroom(shape8b):
    """usable = (GPU - 2 GiB) x 0.9: the verdict flips where the peak crosses it."""
    cfg = load_plan_config(LORA_1GPU)
    prec = precision_for("bfloat16", "bf16", "adamw", lora=True)
    phases = run_phases(cfg, shape8b, prec)

    def row(gib: float):
        rows = plan(shape8b, phases, model_dtype="bfloat16", mixed_precision="bf16",
                    lora=(16, "all-linear"), gpus=[1], gpu_memory_gib=gib)  # fmt: skip
        return next(
            r for r in rows if (r.strategy, r.tuning, r.optimizer) == ("ddp", "lora", "adamw")
        )

    peak = row(80).peak
    threshold = (peak / 0.9 + 2 * GIB) / GIB  # the smallest GPU it fits
    assert row(threshold + 0.01).fits and not row(threshold - 0.01).fits
    assert fits(peak, threshold + 0.01) and not fits(peak, threshold - 0.01)
    assert row(80).fits  # what the recipe claims: 8B LoRA on one 80 GB GPU


def test_recipes_load_without_their_data_files():
    """load_run_config checks data files by default; the recipes' data is the user's,
    so srlm plan loads them with check_files=False."""
    for recipe in (LORA_1GPU, FULL_8GPU):
        cfg = load_run_config(recipe, check_files=False)
        assert Path(cfg.model.path) == SHAPES / "llama-3.1-8b"
        with pytest.raises(ConfigError, match=r"data\.ift\.path: .* does not exist"):
            load_run_config(recipe)


def _table_rows(text: str) -> dict[tuple[str, str, str, int], list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(
            r"\| (DDP|ZeRO-2|ZeRO-3) \| (full|lora) \| (adamw8bit|adamw) \| (\d+) \|", line
        )
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(m[1], m[2], m[3], int(m[4]))] = cells[4:]
    return rows


def test_cli_prints_the_table_of_the_plan(capsys, shape8b):
    assert main(["plan", str(FULL_8GPU), "--gpus", "1", "8", "--gpu-memory", "80"]) == 0
    table = _table_rows(capsys.readouterr().out)
    cfg = load_plan_config(FULL_8GPU)
    phases = run_phases(cfg, shape8b, precision_for("bfloat16", "bf16", "adamw", lora=False))
    rows = plan(shape8b, phases, model_dtype="bfloat16", mixed_precision="bf16",
                lora=(8, "all-linear"), gpus=[1, 8], gpu_memory_gib=80)  # fmt: skip
    assert len(table) == len(rows) == 3 * 2 * 2 * 2
    names = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
    for r in rows:
        cells = table[(names[r.strategy], r.tuning, r.optimizer, r.gpus)]
        numbers = [r.params, r.grads, r.optimizer_state, r.buffers, r.train, r.reference]
        assert cells[:8] == [f"{x / GIB:.1f}" for x in [*numbers, r.sampling, r.peak]]
        assert cells[8] == ("yes" if r.fits else "no")
    # the recipe's claim: full 8B fits 8 x 80 GB with ZeRO-2, not with DDP
    assert table[("ZeRO-2", "full", "adamw", 8)][8] == "yes"
    assert table[("DDP", "full", "adamw", 8)][8] == "no"

    assert main(["plan", str(FULL_8GPU), "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_params"] == shape8b.num_params
    z2 = next(r for r in data["rows"] if (r["strategy"], r["tuning"], r["optimizer"]) ==
              ("zero2", "full", "adamw"))  # fmt: skip
    assert z2["peak"] == next(
        r.peak
        for r in rows
        if (r.strategy, r.tuning, r.optimizer, r.gpus) == ("zero2", "full", "adamw", 8)
    )


def test_vllm_budget_replaces_the_kv_cache(tmp_path, capsys):
    """A generation: section choosing vLLM: sampling holds the trainer's weights plus
    gpu_memory_utilization of the GPU; the overrides (KEY=VALUE) apply as in srlm run."""
    text = LORA_1GPU.read_text().replace("./shapes/", f"{SHAPES}/")
    path = tmp_path / "vllm.yaml"
    path.write_text(text)  # the recipe samples with vLLM; the override sets its share
    overrides = ["generation.vllm.gpu_memory_utilization=0.5", "preference_max_seq_len=1024"]
    argv = ["plan", str(path), *overrides, "--gpus", "1", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vllm_gpu_memory_utilization"] == 0.5
    row = next(r for r in data["rows"] if (r["strategy"], r["tuning"], r["optimizer"]) ==
               ("ddp", "lora", "adamw"))  # fmt: skip
    assert row["sampling"] == row["params"] + int(0.5 * 80 * GIB)
    assert {p["seq_len"] for p in data["phases"] if p["kind"] == "train"} == {2048, 1024}


def test_bad_plan_inputs_name_the_key_and_the_fix(tmp_path, capsys):
    assert main(["plan", str(LORA_1GPU), "--gpus", "0"]) == 2
    assert "--gpus: counts must be >= 1" in capsys.readouterr().err
    empty = tmp_path / "model"
    empty.mkdir()
    cfg = load_run_config(LORA_1GPU, check_files=False, overrides=[f"model.path={empty}"])
    with pytest.raises(ConfigError, match="has no config.json; srlm plan reads"):
        model_shape(cfg)


def test_xtransformers_shape_counts_the_real_model():
    from x_transformers import Decoder, TransformerWrapper

    kw = {"num_tokens": 256, "max_seq_len": 64, "attn_layers": {"dim": 32, "depth": 2, "heads": 4}}
    shape = shape_from_xtransformers(kw)
    real = TransformerWrapper(
        num_tokens=256, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=4)
    )
    assert shape.num_params == sum(p.numel() for p in real.parameters())
    assert (shape.layers, shape.hidden, shape.intermediate, shape.glu) == (2, 32, 128, False)


def test_plan_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: srlm plan") and "--gpu-memory" in out
