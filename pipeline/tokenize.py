"""Tokenize pairs once, with an exact prompt/completion boundary, EOS and truncation.

Boundary rule (TRL 1.16's, trl/trainer/dpo_trainer.py `tokenize_fn`): the prompt is tokenized alone (a
conversation: its generation prompt, add_generation_prompt=True) and prompt+chosen, prompt+rejected each as one
text; the prompt ids are the leading tokens all three share, and each completion is the rest of its joint
tokenization. So `prompt_ids + chosen_ids` is always exactly `tokenize(prompt_text + chosen_text)` (+ EOS for
plain text), token for token what TRL 1.16 trains on. Where the tokenizer merges text across the boundary, the
prompt's own last tokens are not a prefix of the joint ones: "Answer: " + "4" gives "Answer:", " " alone but
"Answer:", " 4" together; a Llama-3-style header rendered as plain text ends the generation prompt in one "\n\n"
token that the joint text splits into "\n", "\n" before the reply. Such a row is *boundary-merged*: its prompt
ids stop before the merged tail (TRL 1.16 does the same and warns once), and that tail is scored as the start of
the completion, so the context differs from the one the model sees when it generates (the prompt tokenized
alone). Rows that are not boundary-merged have prompt_ids == the prompt tokenized alone, exactly what generation
starts from. Precompute counts boundary-merged rows (summary, manifest `dataset.boundary_merged`);
`strict_boundary` (--strict-boundary) rejects them (kind `boundary_merge`) instead.

System messages (`system_message`): "keep" renders them as given; "fold" merges a leading system message into
the first user turn ("{system}\n\n{user}", or a user turn of its own when none follows) before the template is
applied, for templates without a system role (Gemma's raises "System role not supported").

Conversations are rendered with the tokenizer's chat template: the prompt with `add_generation_prompt=True`,
the whole conversation without. The prompt rendering must be a prefix of both conversations' renderings (a row
where it is not is rejected with the place they part, never split elsewhere), and the completion is exactly the
template's text after it: the assistant turn with the template's own end-of-turn token and trailing text
(ChatML's `<|im_end|>` and newline), nothing appended. So `prompt_ids + chosen_ids == tokenize(render(prompt + chosen))`.
Rendered text already holds its special tokens, so it is tokenized with add_special_tokens=False (as
apply_chat_template(tokenize=True) does); plain text uses the tokenizer's default special tokens (e.g. BOS).

Truncation (TRL's convention): when prompt + longer completion > max_length, the prompt is cut to
max_prompt_length (keep_end: its last tokens; keep_start: its first), then completions are cut from the right
to fit. EOS is appended to plain-text completions that do not already end with it, never to chat-template
completions; truncation may cut either end of turn (the pair is then marked truncated).
"""

from dataclasses import dataclass

import numpy as np

from pipeline.data import Pair
from pipeline.reject import Reject

SYSTEM_MESSAGE = ("keep", "fold")  # --system-message


@dataclass
class Tokenized:
    pair: Pair
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    truncated: bool
    boundary_merged: int = 0  # tokens at the end of the prompt tokenized alone that merged into the completion

    @property
    def shared_prefix_len(self) -> int:
        n = 0
        for a, b in zip(self.chosen_ids, self.rejected_ids):
            if a != b:
                break
            n += 1
        return n


def settings(tokenizer, max_length, max_prompt_length, truncation_mode, prompt_split="auto", system_message="keep",
             strict_boundary=False) -> dict:
    """What goes into the manifest's `tokenization` block (and the settings fingerprint: a change refuses resume)."""
    return {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
        "completion_truncation": "keep_start",
        "eos": "appended to plain-text completions unless they end with eos_token_id; never to chat-template ones",
        "chat_completion": "the template's text after the prompt rendered with add_generation_prompt=True, its "
                           "end of turn and trailing text included; rows it does not prefix are rejected",
        "prompt_split": prompt_split,
        "eos_token_id": tokenizer.eos_token_id,
        "boundary": "joint tokenization of prompt+completion; prompt = shared leading tokens",
        "strict_boundary": bool(strict_boundary),  # rows whose prompt tail merges into the completion: rejected
        "system_message": system_message,
        "special_tokens": "tokenizer default for plain text; none added to chat-template text",
        "chat_template": "tokenizer's own (see tokenizer.chat_template_sha256)" if tokenizer.chat_template
        else None,
    }


class PairTokenizer:
    def __init__(self, tokenizer, max_length=1024, max_prompt_length=512, truncation_mode="keep_end",
                 system_message="keep", strict_boundary=False):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id")
        if system_message not in SYSTEM_MESSAGE:
            raise ValueError(f"system_message {system_message!r}: one of {', '.join(SYSTEM_MESSAGE)}")
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.system_message = system_message
        self.strict_boundary = strict_boundary

    def options(self) -> dict:
        """The constructor's arguments besides the tokenizer (to make the same PairTokenizer elsewhere)."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_mode": self.truncation_mode, "system_message": self.system_message,
                "strict_boundary": self.strict_boundary}

    def texts(self, pair: Pair):
        """(prompt_text, chosen_full_text, rejected_full_text, add_special_tokens)."""
        if isinstance(pair.prompt, str):
            return pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected, True
        if not self.tok.chat_template:
            raise Reject("no_chat_template", "conversational row but the tokenizer has no chat template")
        prompt = fold_system(pair.prompt) if self.system_message == "fold" else pair.prompt
        try:
            p = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            c = self.tok.apply_chat_template(prompt + pair.chosen, tokenize=False)
            r = self.tok.apply_chat_template(prompt + pair.rejected, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template error is this row's problem
            hint = ("; --system-message fold merges it into the first user turn"
                    if self.system_message == "keep" and prompt[0]["role"] == "system" else "")
            raise Reject("template_error",
                         f"chat template failed: {type(e).__name__}: {' '.join(str(e).split())}{hint}") from None
        for side, full in (("chosen", c), ("rejected", r)):
            if not full.startswith(p):
                raise Reject("not_a_prefix", _not_a_prefix(p, full, side))
        return p, c, r, False

    def __call__(self, pairs: list[Pair]):
        """Tokenize a batch. Returns (list[Tokenized], list[(Pair, Reject)])."""
        kept, rejected, texts = [], [], []
        for pair in pairs:
            try:
                texts.append((pair, self.texts(pair)))
            except Reject as e:
                rejected.append((pair, e))
        for special in (True, False):
            group = [(pair, t) for pair, t in texts if t[3] == special]
            if not group:
                continue
            flat = [s for _, t in group for s in t[:3]]
            ids = self.tok(flat, add_special_tokens=special)["input_ids"]
            for j, (pair, _) in enumerate(group):
                try:
                    kept.append(self._one(pair, ids[3 * j], ids[3 * j + 1], ids[3 * j + 2]))
                except Reject as e:
                    rejected.append((pair, e))
        kept.sort(key=lambda t: t.pair.index)
        return kept, rejected

    def _one(self, pair, p, c, r) -> Tokenized:
        """One pair from its three tokenizations: p the prompt alone, c and r prompt+chosen, prompt+rejected."""
        n = 0
        for a, b, d in zip(p, c, r):
            if not (a == b == d):
                break
            n += 1
        if n == 0:
            raise Reject("no_prompt_tokens",
                         "the prompt's first token merges with the completion: no prompt token to condition on")
        if n < len(p) and self.strict_boundary:
            raise Reject("boundary_merge", self._merged(p, c if c[:len(p)] != p else r, n))
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if isinstance(pair.prompt, str):  # plain text ends with EOS; a chat template ends its turn itself
            eos = self.tok.eos_token_id
            chosen = chosen if chosen and chosen[-1] == eos else chosen + [eos]
            rejected = rejected if rejected and rejected[-1] == eos else rejected + [eos]
        if not (chosen and rejected):
            raise Reject("empty_completion",
                         f"the {'chosen' if not chosen else 'rejected'} completion renders to no tokens")
        if chosen == rejected:
            raise Reject("same_completion", "chosen and rejected render to the same tokens")
        if len(prompt) > self.max_length:
            raise Reject("too_long", f"prompt has {len(prompt)} tokens, longer than max_length {self.max_length} "
                                     "(raise --max-length or shorten the prompt)")
        truncated = False
        if len(prompt) + max(len(chosen), len(rejected)) > self.max_length:
            if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
                k = self.max_prompt_length
                prompt = prompt[-k:] if self.truncation_mode == "keep_end" else prompt[:k]
                truncated = True
            room = self.max_length - len(prompt)
            if room < 1:
                raise Reject("too_long", f"prompt has {len(prompt)} tokens, leaving no room for the completion "
                                         f"within max_length {self.max_length} (set --max-prompt-length)")
            if max(len(chosen), len(rejected)) > room:
                chosen, rejected, truncated = chosen[:room], rejected[:room], True
            if chosen == rejected:
                raise Reject("same_after_truncation",
                             f"chosen and rejected are identical after truncation to max_length {self.max_length}")
        return Tokenized(pair, prompt, chosen, rejected, truncated, len(p) - n)

    def _merged(self, p, joint, n) -> str:
        """Why a boundary-merged row is rejected: the prompt's last tokens alone, and those tokens' text as the
        joint tokenization splits it."""
        def pieces(ids):
            return [self.tok.decode([t]) for t in ids]

        k = len(p) - n
        return (f"the prompt alone ends in token{'s' if k > 1 else ''} {pieces(p[n:])} but tokenized with the "
                f"completion that text becomes {pieces(joint[n:n + k + 2])}...: the completion would be scored "
                "after a prompt the model does not see when it generates (--strict-boundary)")


def fold_system(messages: list) -> list:
    """A leading system message merged into the first user turn after it ("{system}\n\n{user}"), or made a user
    turn itself when a user turn does not follow; the messages unchanged without one."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def _not_a_prefix(prompt: str, full: str, side: str) -> str:
    """Why a conversation cannot be split: where its rendering parts from the prompt's rendering."""
    i = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    lo = max(0, i - 24)
    return (f"chat template renders the prompt (add_generation_prompt=True) as ...{prompt[lo:i + 16]!r} but the "
            f"{side} conversation as ...{full[lo:i + 16]!r}: the prompt is not a prefix, so the completion cannot "
            "be split off exactly")


def sequences(batch: list[Tokenized]):
    """The 2*B token sequences to score (chosen then rejected per pair) and where each completion starts."""
    seqs, starts = [], []
    for t in batch:
        seqs += [t.prompt_ids + t.chosen_ids, t.prompt_ids + t.rejected_ids]
        starts += [len(t.prompt_ids)] * 2
    return seqs, np.asarray(starts)
