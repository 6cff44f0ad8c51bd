"""The Hugging Face path: tiny local Llama + locally trained tokenizer, pad handling, chat
templates on prompts, data loaders (JSONL / JSON / CSV / Parquet / datasets folders, chat
messages), LoRA training and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from self_rewarding_lm_pytorch.config import DataSource, LoRAConfig
from self_rewarding_lm_pytorch.hf import (
    TINY_CHAT_TEMPLATE,
    apply_lora,
    build_tiny_model,
    ensure_pad_token,
    export_model,
    is_peft_model,
    load_model,
    load_tokenizer,
)
from self_rewarding_lm_pytorch.io import load_prompts, load_sft, read_rows
from self_rewarding_lm_pytorch.losses import sequence_logprobs
from self_rewarding_lm_pytorch.models import HFTokenizer, unwrap_model
from self_rewarding_lm_pytorch.pipeline import preference_example, tokenize_sft_item


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Llama (hidden 32, 2 layers, vocab 119) and a word-level tokenizer trained
    here with a chat template; no pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ====================================================================== tokenizers


def test_tokenizer_without_pad_token_pads_with_eos(tiny):
    raw = json.loads((tiny / "tokenizer_config.json").read_text())
    assert raw.get("pad_token") is None  # the saved tokenizer really has no pad token
    tok = load_tokenizer(tiny)
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert tok.padding_side == "right"
    model = load_model(tiny)
    model.generation_config.pad_token_id = None
    ensure_pad_token(tok, model)
    assert model.generation_config.pad_token_id == tok.eos_token_id
    adapter = HFTokenizer(tok)
    assert adapter.pad_id == adapter.eos_id == tok.eos_token_id
    # batch padding works and is masked
    batch = tok(["the cat", "the big red dog"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1] == tok.eos_token_id and batch["attention_mask"][0, -1] == 0


def test_tokenizer_with_neither_pad_nor_eos_is_rejected(tiny):
    tok = load_tokenizer(tiny)
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        ensure_pad_token(tok)


def test_chat_template_is_applied_to_prompts_and_training_examples(tiny, tmp_path):
    tok = HFTokenizer(load_tokenizer(tiny))
    ids = tok.tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    user, assistant, end = ids
    # prompt of an SFT item (as io.load_sft gives it) goes through the chat template
    ex = tokenize_sft_item({"prompt": "tell me a story", "response": "the cat sat"}, tok)
    prompt = ex.input_ids[: ex.prompt_len]
    assert prompt[0] == user and prompt[-1] == assistant and end in prompt
    assert ex.input_ids[-1] == tok.eos_id  # EOS ends the response
    pref = preference_example("what is a dog ?", "a dog", "red", tok)
    assert pref.prompt_ids[0] == user and pref.prompt_ids[-1] == assistant
    # a replaced template (chat_template_file) is the one used
    tpl = tmp_path / "t.jinja"
    tpl.write_text(
        "{% for m in messages %}<|system|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|end|> {% endif %}"
    )
    tok2 = HFTokenizer(load_tokenizer(tiny, chat_template_file=tpl))
    enc = tok2.encode(tok2.format_prompt("the cat"))
    assert enc[0] == tok2.tokenizer.convert_tokens_to_ids("<|system|>") and enc[-1] == end
    assert user not in enc


def test_multi_turn_chat_sft_is_tokenized_with_the_template(tiny, tmp_path):
    tok = HFTokenizer(load_tokenizer(tiny))
    msgs = [
        {"role": "system", "content": "be good"},
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "the sun"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversation": msgs}) + "\n")
    (item,) = load_sft(DataSource(path=str(path), messages_field="conversation"), tok)
    full = tok.tokenizer.apply_chat_template(msgs, tokenize=False)
    expected = tok.tokenizer.encode(full, add_special_tokens=False)
    assert item["prompt_ids"] + item["response_ids"] == expected
    response = tok.tokenizer.convert_ids_to_tokens(item["response_ids"])
    assert response == ["the", "sun", "<|end|>"]  # only the last assistant turn is trained
    assert tok.tokenizer.convert_ids_to_tokens(item["prompt_ids"][:1]) == ["<|system|>"]
    ex = tokenize_sft_item(item, tok)
    assert ex.prompt_len == len(item["prompt_ids"])


def _bos_tokenizer(tiny: Path, out: Path, chat_template: str | None) -> HFTokenizer:
    """The tiny tokenizer with a Llama-style post-processor that adds ``<s>`` in front of
    every text encoded with special tokens, saved and loaded back from ``out``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = load_tokenizer(tiny)
    backend = base.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", base.bos_token_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    tok = HFTokenizer(load_tokenizer(out))
    assert tok.tokenizer.encode("the cat")[0] == tok.tokenizer.bos_token_id  # really adds BOS
    return tok


@pytest.mark.parametrize("template", [None, "{{ bos_token }}" + TINY_CHAT_TEMPLATE])
def test_bos_starts_the_prompt_once_and_never_enters_a_response(tiny, tmp_path, template):
    """A tokenizer that adds BOS: an SFT example, a DPO pair and a judge prompt each hold
    exactly one BOS, at the very start; the responses (inside the loss mask) hold none, and
    a chat template that writes BOS itself does not get a second one."""
    tok = _bos_tokenizer(tiny, tmp_path / "tok", template)
    bos = tok.tokenizer.bos_token_id
    ex = tokenize_sft_item({"prompt": "tell me a story", "response": "the cat sat"}, tok)
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1
    response = ex.input_ids[ex.prompt_len :]
    assert response == tok.tokenizer.encode("the cat sat", add_special_tokens=False) + [tok.eos_id]
    pair = preference_example("what is a dog ?", "a dog", "red", tok)
    assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert bos not in ids and ids[-1] == tok.eos_id
    # the judge: the candidate sits inside the judge prompt, which starts with one BOS
    from self_rewarding_lm_pytorch.judge import LLMJudge, RewardConfig

    config = RewardConfig(
        "{{ prompt }} : {{ response }} score", reward_regex_template="{{ reward }}"
    )
    judge = LLMJudge(load_model(tiny), tok, config, max_new_tokens=4)
    (ids,), _ = judge._encode_judge_prompts(["what is a dog ?"], ["a dog"])
    assert ids[0] == bos and ids.count(bos) == 1
    plain = [t for t in ids if t != bos]
    assert tok.decode(ids) == tok.decode(plain)  # BOS is the only special token added


# ====================================================================== data loaders

ROWS = [
    {"prompt": "tell me a story", "response": "the cat sat"},
    {"prompt": "what is a dog ?", "response": "a dog ran"},
    {"prompt": "why is the sky blue ?", "response": "the sun"},
]


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["csv"] = tmp_path / "d.csv"
    paths["csv"].write_text(
        "prompt,response\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\n' for r in ROWS)
    )
    paths["tsv"] = tmp_path / "d.tsv"
    paths["tsv"].write_text(
        "prompt\tresponse\n" + "".join(f"{r['prompt']}\t{r['response']}\n" for r in ROWS)
    )
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), str(paths["parquet"]))
    paths["datasets"] = tmp_path / "ds"
    Dataset.from_list(ROWS).save_to_disk(str(paths["datasets"]))
    paths["datasetdict"] = tmp_path / "dsd"
    DatasetDict(
        {"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(paths["datasetdict"]))
    return paths


def test_loaders_read_every_format_to_the_same_rows(tmp_path):
    paths = _write_all_formats(tmp_path)
    for fmt in ("jsonl", "json", "csv", "tsv", "parquet", "datasets"):
        src = DataSource(path=str(paths[fmt]))
        assert load_sft(src) == ROWS, fmt
        assert load_prompts(src) == [r["prompt"] for r in ROWS], fmt
    # a DatasetDict needs a split; the error lists them
    with pytest.raises(ValueError, match="several splits"):
        read_rows(paths["datasetdict"])
    assert read_rows(paths["datasetdict"], split="test") == ROWS[:1]
    assert len(read_rows(paths["jsonl"], limit=2)) == 2
    # an explicit format overrides the suffix
    odd = tmp_path / "rows.txt"
    odd.write_text(paths["jsonl"].read_text())
    assert load_prompts(DataSource(path=str(odd), format="jsonl"))[1] == "what is a dog ?"
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_rows(odd)
    # small data can be inline in the YAML instead of a file
    assert load_sft(DataSource(rows=ROWS, limit=2)) == ROWS[:2]
    with pytest.raises(ValueError, match="exactly one of path"):
        DataSource(path=str(odd), rows=ROWS)


def test_loaders_field_names_and_chat_messages(tmp_path):
    rows = [
        {"instruction": "tell me a story", "output": "the cat sat"},
        {"instruction": "what is a dog ?", "output": "a dog ran"},
    ]
    p = tmp_path / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = DataSource(path=str(p), prompt_field="instruction", response_field="output")
    assert load_sft(src) == [{"prompt": r["instruction"], "response": r["output"]} for r in rows]
    with pytest.raises(ValueError, match=r"no field 'prompt' \(fields: instruction, output\)"):
        load_prompts(DataSource(path=str(p)))
    # chat messages: a list in JSONL, a JSON string in a CSV cell; single turns become text
    chat = [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "the cat sat"},
    ]
    pj = tmp_path / "chat.jsonl"
    pj.write_text(json.dumps({"messages": chat}) + "\n")
    assert load_sft(DataSource(path=str(pj))) == [ROWS[0]]  # "messages" column found by default
    pc = tmp_path / "chat.csv"
    pc.write_text('msgs\n"' + json.dumps(chat).replace('"', '""') + '"\n')
    assert load_sft(DataSource(path=str(pc), messages_field="msgs")) == [ROWS[0]]
    assert load_prompts(DataSource(path=str(pc), messages_field="msgs")) == ["tell me a story"]
    # SFT needs the assistant's answer last; prompts must be single user turns
    pu = tmp_path / "q.jsonl"
    pu.write_text(json.dumps({"messages": chat[:1]}) + "\n")
    with pytest.raises(ValueError, match="assistant's answer"):
        load_sft(DataSource(path=str(pu)))
    sysmsg = [{"role": "system", "content": "be good"}, *chat[:1]]
    ps = tmp_path / "sys.jsonl"
    ps.write_text(json.dumps({"messages": sysmsg}) + "\n")
    with pytest.raises(ValueError, match="single user turn"):
        load_prompts(DataSource(path=str(ps)))


# ====================================================================== LoRA


def _logps(model, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return sequence_logprobs(logits, input_ids, response_mask)


def _pairs(tok: HFTokenizer):
    return [
        preference_example("tell me a story", "the cat sat on the mat", "red blue", tok),
        preference_example("what is a dog ?", "a dog is a fast animal", "the sun", tok),
    ]


def _lora_model(tiny: Path):
    torch.manual_seed(0)
    model = load_model(tiny)
    # init_lora_weights=False: a non-zero adapter, so "adapter off" differs from "adapter on"
    return apply_lora(
        model,
        LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        init_lora_weights=False,
    )


def test_lora_trains_only_adapter_weights(tiny):
    from self_rewarding_lm_pytorch.trainers import DPOTrainer

    tok = HFTokenizer(load_tokenizer(tiny))
    model = _lora_model(tiny)
    assert is_peft_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPOTrainer(
        model,
        train_dataset=_pairs(tok),
        batch_size=2,
        num_train_steps=1,
        start_learning_rate=1e-2,
        end_learning_rate=1e-2,
        accelerate_kwargs={"cpu": True},
        progress=False,
        seed=0,
    )
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the DPO step changed nothing"
    assert changed <= trainable  # base weights are untouched
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_lora_dpo_reference_is_the_base_model_or_the_current_adapter(tiny):
    """Issue 5: with ``ref_adapter="disabled"`` the DPO reference of a PEFT model is the
    same model with the adapter switched off (no second copy in memory), so its log-probs
    equal the base model's; the default (``"current"``, the paper's M_t) keeps the adapter."""
    from self_rewarding_lm_pytorch.data import collate_preference
    from self_rewarding_lm_pytorch.trainers import DPOTrainer

    tok = HFTokenizer(load_tokenizer(tiny))
    pairs = _pairs(tok)
    batch = collate_preference(pairs)
    base = load_model(tiny).eval()
    base_logps = _logps(base, batch["input_ids"], batch["response_mask"])
    for ref_adapter in ("disabled", "current"):
        model = _lora_model(tiny)
        with_adapter = _logps(model.eval(), batch["input_ids"], batch["response_mask"])
        assert not torch.allclose(base_logps, with_adapter, atol=1e-3)  # the adapter matters
        trainer = DPOTrainer(
            model,
            train_dataset=pairs,
            batch_size=2,
            num_train_steps=1,
            ref_adapter=ref_adapter,
            accelerate_kwargs={"cpu": True},
            progress=False,
            seed=0,
        )
        trainer.train()
        assert trainer.ref_logps is not None
        ref = torch.cat([trainer.ref_logps[:, 0], trainer.ref_logps[:, 1]]).cpu()
        want = base_logps if ref_adapter == "disabled" else with_adapter
        torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)
        # the adapter is on again after the reference pass (training used it)
        assert not torch.allclose(
            _logps(model.eval(), batch["input_ids"], batch["response_mask"]), base_logps
        )


def test_lora_stage_checkpoint_is_an_adapter_folder_that_peft_and_the_loaders_open(tiny, tmp_path):
    """A PEFT model's stage checkpoint is a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors, the tokenizer beside it): ``PeftModel.from_pretrained``,
    ``hf.load_model`` and the pipeline's resume all give back the trained model."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from self_rewarding_lm_pytorch.pipeline import SelfRewardingTrainer, SFTStage
    from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint

    def run(model):
        return SelfRewardingTrainer(
            model,
            tokenizer=load_tokenizer(tiny),
            datasets={"sft": ROWS * 2},
            stages=[
                SFTStage(trainer=dict(batch_size=2, num_train_steps=2, start_learning_rate=1e-2))
            ],
            checkpoints_folder=str(tmp_path / "run"),
            accelerate_kwargs={"cpu": True},
            progress=False,
        ).run()

    trained = _lora_model(tiny)
    before = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    run(trained)
    assert any(not torch.equal(p, before[n]) for n, p in trained.named_parameters() if n in before)
    ckpt = tmp_path / "run" / "01-sft" / "checkpoint"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "config.json").exists()
    keys = list(load_file(str(ckpt / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys)  # the adapter only, no base weights
    assert (ckpt / "tokenizer_config.json").exists()
    assert not list(ckpt.parent.glob(".checkpoint.*"))  # no temporary folder left behind
    x = torch.tensor([load_tokenizer(tiny).encode("the cat sat on the mat")])
    with torch.no_grad():
        want = trained.eval()(input_ids=x).logits
        for model in (
            PeftModel.from_pretrained(load_model(tiny), str(ckpt)),
            load_model(ckpt),
            load_checkpoint(_lora_model(tiny), ckpt),
        ):
            got = model.eval()(input_ids=x).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # resume: the run's initial LoRA model, rebuilt, gets the trained adapter back (another
    # initial model would be refused by the run's fingerprint)
    fresh = _lora_model(tiny)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(input_ids=x).logits, want, atol=1e-3)
    run(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


def test_export_merged_and_adapter_reproduce_the_lora_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny)
    x = torch.tensor([tok.encode("the cat sat on the mat", add_special_tokens=False)])
    model = _lora_model(tiny).eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    # adapter only: small, no base weights, and load_model restores the same function
    adapter_dir = export_model(
        model, tmp_path / "adapter", tokenizer=tok, mode="adapter", base_model_path=tiny
    )
    from safetensors.torch import load_file

    keys = list(load_file(str(adapter_dir / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    reloaded = load_model(adapter_dir).eval()
    assert is_peft_model(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
    # merged: a plain Llama that from_pretrained loads, same logits, and it generates
    merged_dir = export_model(model, tmp_path / "merged", tokenizer=tok, mode="merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not is_peft_model(plain) and type(plain).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
    out = plain.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > x.shape[1]
    assert (merged_dir / "tokenizer_config.json").exists()


def test_export_adapter_needs_a_lora_model_and_missing_folders_are_named(tiny, tmp_path):
    model = load_model(tiny)
    with pytest.raises(ValueError, match="mode='merged'"):
        export_model(model, tmp_path / "x", mode="adapter")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_model(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, LoRAConfig(target_modules=["no_such_proj"]))
    assert unwrap_model(model) is model
