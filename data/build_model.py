"""Rebuild the embedded reference model data/tiny-llama deterministically.

  .venv/bin/python data/build_model.py                      # the committed model (defaults)
  .venv/bin/python data/build_model.py --steps 50 --out /tmp/quick
  .venv/bin/python data/build_model.py --hidden 512 --layers 8 --heads 8 --intermediate 1408 \
      --vocab 4096 --out bench/work/llama-30m               # a bigger variant for benchmarks

1. Generate a synthetic corpus (data/synthetic.py: arithmetic, word problems, small word tasks),
   as plain "Question: ...\nAnswer: ..." documents and chat-template conversations.
2. Train a byte-level BPE tokenizer on it (digits split one per token), with a chat template.
3. Train a LlamaForCausalLM (head_dim 64, tied embeddings) with AdamW on CPU, one document per
   row starting at position 0 (half of them with a leading <s>, so scores are sensible either way).
4. save_pretrained (safetensors, fp32) + tokenizer + generation_config + training.json.

Everything is seeded; the tokenizer depends only on --vocab and --tokenizer-docs, not on --steps.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each message is "<|role|>\n{content}</s>"; the generation prompt is "<|assistant|>\n".
# So prompt + completion splits exactly at the assistant turn: the completion text rendered by
# the template is "{content}</s>" (it already ends with EOS). No BOS in the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_chat(messages, add_generation_prompt=False):
    """Same rendering as CHAT_TEMPLATE, without needing a tokenizer (used to write the corpus)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{EOS}" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def corpus(seed, n):
    rng = random.Random(seed)
    return [synthetic.corpus_document(rng, render_chat) for _ in range(n)]


def train_tokenizer(vocab_size, n_docs, seed=1234):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Plain English-ish filler so the vocabulary is not only the task templates.
    filler = [" ".join(synthetic.WORDS[i : i + 12]) for i in range(0, len(synthetic.WORDS), 12)]
    tok.train_from_iterator(corpus(seed, n_docs) + filler, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return fast


def save_tokenizer(tok, out):
    """tokenizer.json + tokenizer_config.json with the chat template inside it. The class is named
    PreTrainedTokenizerFast (what transformers 4.x and 5.x both load) and the role tokens are listed
    as additional_special_tokens."""
    tok.save_pretrained(out, save_jinja_files=False)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = ROLE_TOKENS
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def encode_docs(tok, docs, rng):
    out = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids = ids + [tok.eos_token_id]
        if rng.random() < 0.5:
            ids = [tok.bos_token_id] + ids
        out.append(ids)
    return out


def batches(tok, seed, batch_size, group=8):
    """Endless length-grouped batches: draw group*batch_size docs, sort by length, shuffle batches."""
    rng = random.Random(seed)
    while True:
        docs = encode_docs(
            tok, [synthetic.corpus_document(rng, render_chat) for _ in range(batch_size * group)], rng
        )
        docs.sort(key=len)
        chunk = [docs[i : i + batch_size] for i in range(0, len(docs), batch_size)]
        rng.shuffle(chunk)
        yield from chunk


def collate(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@torch.no_grad()
def mean_token_loss(model, tok, docs, batch_size=32):
    """Mean next-token loss (nats) over docs, each scored from position 0 without BOS."""
    rng = random.Random(0)
    rows = [ids[1:] if ids[0] == tok.bos_token_id else ids for ids in encode_docs(tok, docs, rng)]
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(rows), batch_size):
        ids, mask, labels = collate(rows[i : i + batch_size], tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), tgt, ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += (tgt != -100).sum().item()
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-docs", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-llama"))
    args = ap.parse_args()
    assert args.hidden % args.heads == 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = train_tokenizer(args.vocab, args.tokenizer_docs)
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.1f}s)", flush=True)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, head_dim {config.head_dim}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    data = batches(tok, args.seed + 1, args.batch_size)
    losses, t_train = [], time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, mask, labels = collate(next(data), tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {el:6.1f}s "
                f"eta {el / (step + 1) * (args.steps - step - 1):5.0f}s",
                flush=True,
            )
    train_seconds = time.time() - t_train
    final_loss = sum(losses[-50:]) / len(losses[-50:])

    heldout = mean_token_loss(model, tok, corpus(args.seed + 999, 256))
    print(
        f"final train loss (mean of last {len(losses[-50:])} steps) {final_loss:.4f}; "
        f"held-out corpus loss {heldout:.4f} nats/token; uniform ln(V) = {math.log(len(tok)):.4f}"
    )

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    save_tokenizer(tok, args.out)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(args.out)
    record = {
        "params": n_params,
        "vocab_size": len(tok),
        "args": vars(args) | {"out": os.path.basename(args.out)},
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "final_train_loss": round(final_loss, 4),
        "heldout_corpus_loss": round(heldout, 4),
        "uniform_loss": round(math.log(len(tok)), 4),
        "loss_curve": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)
        ],
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"saved {args.out} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
