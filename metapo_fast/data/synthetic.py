"""The embedded default task: a preference data set with known ground truth, generated in code.

Nothing here downloads anything. It provides

* :func:`build_char_tokenizer`: a character-level ``PreTrainedTokenizerFast`` built from a
  ``tokenizers`` WordLevel model (one token per printable ASCII character, newline and tab), with
  ``<pad>``/``<unk>``/``<bos>``/``<eos>`` and role markers as special tokens and a small chat
  template, so both TRL formats (standard and conversational) run through the same data pipeline;
* :func:`make_synthetic_task`: single-digit addition pairs ``"3+4="`` -> chosen ``"7"``, rejected a
  wrong sum, with a known fraction of flipped labels (``is_flipped``) and of ambiguous pairs
  (``is_ambiguous``: both answers wrong, so the label carries no signal), plus a clean held-out
  evaluation set and SFT rows (prompt + correct answer) for the reference model's warm-up.

Rows are in TRL's standard explicit format ``{"prompt", "chosen", "rejected"}`` plus the ground-truth
columns, so :mod:`metapo_fast.data` loads them like any file. Answers are one or two characters, so
with ``<eos>`` the loss sees 2-3 tokens per response. Measured with a 2-layer Llama (hidden 64, 4
heads), plain DPO (beta 0.1, AdamW lr 3e-4, 32 pairs per step) after 30 SFT steps on the correct
answers (lr 1e-3), 2 CPU cores, ~20 s: held-out preference accuracy goes 0.53 -> 0.85 in 350 steps
with clean labels, but only 0.53 -> 0.62 with 30% flipped labels - the gap a good weighting closes.
(100 SFT steps alone already reach 0.86, so keep the reference warm-up short.)

Everything is deterministic in ``seed`` (NumPy ``default_rng``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "SYNTHETIC_VERSION",
    "SyntheticTask",
    "build_char_tokenizer",
    "make_synthetic_task",
    "task_from_config",
]

# Bump when the generator's output changes: it is part of the tokenisation cache key.
SYNTHETIC_VERSION = 1

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS) + ROLE_TOKENS
_CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

# One line per message: "<|role|>content", then "\n" after system/user turns and "<eos>" after an
# assistant turn. The rendered response of an assistant turn therefore ends in <eos> (the data
# pipeline adds none on top), and the rendered prompt is a strict prefix of prompt + response.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level fast tokenizer built in code (no files, no downloads).

    Vocabulary: the 7 special tokens (ids 0-6: ``<pad> <unk> <bos> <eos> <|system|> <|user|>
    <|assistant|>``), then printable ASCII 32-126, newline and tab (104 tokens in all). Any other
    character maps to ``<unk>``. Special tokens written in text (``"<eos>"``) are matched as single
    tokens. ``decode`` concatenates characters without separators.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own "word": WordLevel then maps it to its id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


@dataclass
class SyntheticTask:
    """Rows of the embedded task (lists of dicts, TRL standard explicit format).

    Attributes:
        train_rows: preference pairs ``{"prompt", "chosen", "rejected", "is_flipped", "is_ambiguous",
            "answer"}``; for a flipped pair ``chosen`` holds the wrong answer.
        eval_rows: clean held-out pairs (never flipped nor ambiguous), same columns.
        sft_rows: ``{"prompt", "completion"}`` with the correct answer (TRL prompt-completion format),
            one per addition fact, for the reference model's SFT warm-up.
    """

    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    sft_rows: list[dict] = field(default_factory=list)


def _wrong_answer(rng: np.random.Generator, correct: int, avoid: int | None = None) -> int:
    """A wrong sum near the correct one (offset 1-3 either way, never negative, != avoid)."""
    while True:
        cand = correct + int(rng.choice([-3, -2, -1, 1, 2, 3]))
        if cand >= 0 and cand != correct and cand != avoid:
            return cand


def _pairs(rng: np.random.Generator, n: int, n_flip: int, n_amb: int) -> list[dict]:
    a = rng.integers(0, 10, size=n)
    b = rng.integers(0, 10, size=n)
    order = rng.permutation(n)
    ambiguous = np.zeros(n, dtype=bool)
    flipped = np.zeros(n, dtype=bool)
    ambiguous[order[:n_amb]] = True
    flipped[order[n_amb:n_amb + n_flip]] = True  # disjoint from the ambiguous pairs
    rows = []
    for i in range(n):
        s = int(a[i] + b[i])
        wrong = _wrong_answer(rng, s)
        if ambiguous[i]:
            good, bad = _wrong_answer(rng, s, avoid=wrong), wrong  # both wrong: no preference signal
        else:
            good, bad = s, wrong
        if flipped[i]:
            good, bad = bad, good
        rows.append(
            {
                "prompt": f"{a[i]}+{b[i]}=",
                "chosen": str(good),
                "rejected": str(bad),
                "is_flipped": bool(flipped[i]),
                "is_ambiguous": bool(ambiguous[i]),
                "answer": str(s),
            }
        )
    return rows


def _true_label(row: dict) -> dict:
    if not row["is_flipped"]:
        return row
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"], "is_flipped": False}


def make_synthetic_task(
    num_pairs: int = 2000,
    flip_fraction: float = 0.3,
    ambiguous_fraction: float = 0.0,
    seed: int = 0,
    num_eval_pairs: int = 500,
    oracle_labels: bool = False,
) -> SyntheticTask:
    """Generate the addition preference task.

    ``oracle_labels``: the same pairs with their true labels, flipped pairs swapped back and
    ambiguous pairs (no true label) removed: the clean-label upper bound of a noisy condition.

    Exactly ``round(flip_fraction * num_pairs)`` pairs are flipped and
    ``round(ambiguous_fraction * num_pairs)`` are ambiguous; the two sets are disjoint, so
    ``flip_fraction + ambiguous_fraction`` must be <= 1. The evaluation rows come from an
    independent stream of the same seed: their prompts overlap the training prompts (there are only
    100 addition facts), their rejected answers are drawn afresh, and none is flipped or ambiguous.
    """
    if num_pairs < 1 or num_eval_pairs < 0:
        raise ValueError(f"num_pairs must be >= 1 and num_eval_pairs >= 0, got {num_pairs}, {num_eval_pairs}")
    for name, v in (("flip_fraction", flip_fraction), ("ambiguous_fraction", ambiguous_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if flip_fraction + ambiguous_fraction > 1.0:
        raise ValueError(
            f"flip_fraction + ambiguous_fraction must be <= 1 (the sets are disjoint), got {flip_fraction} + {ambiguous_fraction}"
        )
    train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    n_flip = int(round(flip_fraction * num_pairs))
    n_amb = int(round(ambiguous_fraction * num_pairs))
    train = _pairs(train_rng, num_pairs, n_flip, n_amb)
    if oracle_labels:  # the generator's draws do not depend on the flags: these are the same pairs
        train = [_true_label(r) for r in train if not r["is_ambiguous"]]
    evaluation = _pairs(eval_rng, num_eval_pairs, 0, 0)
    sft = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    return SyntheticTask(train_rows=train, eval_rows=evaluation, sft_rows=sft)


def task_from_config(s) -> SyntheticTask:
    """The task of a ``data.synthetic`` config section (:class:`metapo_fast.config.schema.SyntheticConfig`)."""
    return make_synthetic_task(s.num_pairs, s.flip_fraction, s.ambiguous_fraction, s.seed, s.num_eval_pairs,
                               oracle_labels=s.oracle_labels)
