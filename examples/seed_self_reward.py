"""The seed README's self-rewarding example, changed only where a random model must be:
its candidates are scored by an external judge (here a simple Python rule) instead of by
the untrained model itself. Same model, data, tokenizer and DPO settings; it completes.

Swap the rule for any judge: another LLM (``LLMJudge``), a reward model
(``RewardModelJudge``) or an API call wrapped in a function ``(prompt, response) -> score``.
"""

import torch
from torch import Tensor
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch import (
    PreferenceStage,
    SelfRewardingTrainer,
    SFTStage,
    create_mock_dataset,
)

transformer = TransformerWrapper(
    num_tokens=256, max_seq_len=1024, attn_layers=Decoder(dim=512, depth=1, heads=8)
)

sft_train_dataset = create_mock_dataset(
    100, lambda: (torch.randint(0, 256, (256,)), torch.tensor(1))
)
prompt_dataset = create_mock_dataset(100, lambda: "mock prompt")


def decode_tokens(tokens: Tensor) -> str:
    return "".join(chr(max(32, int(token))) for token in tokens)


def encode_str(seq_str: str) -> Tensor:
    return Tensor(list(map(ord, seq_str)))


def letters_judge(prompt: str, response: str) -> float:
    """Score 0-5 by the share of ASCII letters in the response (a stand-in external judge)."""
    letters = sum(c.isascii() and c.isalpha() for c in response)
    return round(5 * letters / max(1, len(response)), 1)


trainer = SelfRewardingTrainer(
    transformer,
    train_sft_dataset=sft_train_dataset,
    prompt_dataset=prompt_dataset,
    tokenizer_encode=encode_str,
    tokenizer_decode=decode_tokens,
    preference_max_seq_len=64,
    judges={"letters": letters_judge},
    stages=[
        SFTStage(),
        PreferenceStage(
            kind="external_reward_dpo",
            judge="letters",
            num_preference_pairs=1,
            trainer=dict(batch_size=1),
        ),
        PreferenceStage(
            kind="external_reward_dpo",
            judge="letters",
            num_preference_pairs=1,
            trainer=dict(batch_size=1),
        ),
    ],
    accelerate_kwargs=dict(cpu=True),
)

if __name__ == "__main__":
    report = trainer(overwrite_checkpoints=True)
    for stage in report["stages"]:
        print(stage["stage"], "->", stage["checkpoint"])
