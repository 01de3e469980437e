"""The policy model: load it from a Hugging Face directory (LoRA-wrapped if asked), save the trained one, and
check it and the eval cache against the cache's manifest (the hashes decide, not the paths)."""

import hashlib
import os
import shutil

import torch

from pipeline.cache import content_id, manifest_path
from refcache_base import UserError
from refcache_base.files import swap_dir


def load_causal_lm(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(path):
        raise UserError(f"model directory {path} not found; pass --model with a local Hugging Face model dir")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    _disable_dropout(model)
    return model


def _disable_dropout(model):
    """DPO convention (as in TRL): no dropout, so the policy at step 0 scores exactly like the reference."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def load_policy(cfg):
    """The policy to train, in fp32 with dropout off: cfg.model, with activation checkpointing and LoRA adapters
    if cfg asks for them."""
    model = load_causal_lm(cfg.model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("--lora needs peft: pip install 'refcache[lora]'") from None
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    return model


def write_hf_model(model, source_dir, out_dir):
    """The trained policy in Hugging Face format (merged if LoRA) plus the tokenizer files, atomically."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    to_save.save_pretrained(tmp, safe_serialization=True)
    for f in os.listdir(source_dir):
        if f.startswith(
            ("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template", "added_tokens")
        ) or f.endswith(".model"):
            shutil.copy2(os.path.join(source_dir, f), os.path.join(tmp, f))
    swap_dir(tmp, out_dir)


def trainable_state(model):
    """The weights that train (all of them, or LoRA's), detached on the CPU, by parameter name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable(model, state):
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UserError(f"checkpoint lacks trainable weights ({min(missing)}, ...); start a new --out")
    model.load_state_dict(state, strict=False)


# ---- manifest checks ---------------------------------------------------------------------------------------


def manifest_model_path(manifest, cache_dir):
    model = manifest.get("model") or {}
    path = model.get("path") if isinstance(model, dict) else model
    if not path:
        raise UserError(f"{manifest_path(cache_dir)} names no model path; pass --model")
    for cand in (path, os.path.join(cache_dir, path)):
        if os.path.isdir(cand):
            return cand
    raise UserError(f"model {path} recorded in {manifest_path(cache_dir)} not found here; pass --model DIR")


def check_policy(manifest, model_dir, cache_dir, allow_mismatch) -> str:
    """Refuse a policy whose weights or tokenizer differ from the model the cache was scored with (hashes
    decide; paths do not: a copied model is the same model). Returns the policy's sha256 (model_identity)."""
    from pipeline import fingerprint

    if not os.path.isdir(model_dir):
        raise UserError(
            f"model directory {model_dir} not found; pass --model with a local Hugging Face model dir"
        )
    diffs, ids = [], {}
    for what, ident in (("model", fingerprint.model_identity), ("tokenizer", fingerprint.tokenizer_identity)):
        ids[what] = ident(model_dir)
        diffs += [f"{what} {k}" for k in fingerprint.identity_diff(manifest.get(what) or {}, ids[what], what)]
    if diffs and not allow_mismatch:
        raise UserError(
            f"policy {model_dir} does not match the model cache {cache_dir} was scored with "
            f"(differs: {', '.join(diffs)}), so step 0 would not start at the reference; re-run "
            "precompute with this model, or pass --allow-mismatch to train anyway"
        )
    return ids["model"]["sha256"]


def check_caches(train_manifest, eval_manifest, train_dir, eval_dir, allow_mismatch):
    """The eval cache must come from the same model, tokenizer and tokenization as the train cache."""
    from pipeline import fingerprint

    diffs = []
    for what in ("model", "tokenizer"):
        diffs += [
            f"{what} {k}"
            for k in fingerprint.identity_diff(
                train_manifest.get(what) or {}, eval_manifest.get(what) or {}, what
            )
        ]
    a, b = train_manifest.get("tokenization") or {}, eval_manifest.get("tokenization") or {}
    diffs += [f"tokenization {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs and not allow_mismatch:
        raise UserError(
            f"eval cache {eval_dir} was built differently from {train_dir} (differs: {', '.join(diffs)}); "
            "rebuild it with the same model and settings, or pass --allow-mismatch"
        )


def cache_fingerprint(cache_dir, manifest):
    """What a run records of a cache: where it was (informative) and what it is (content_sha256 decides: see
    pipeline.cache.content_id), with the manifest's identity fields for the reader."""
    with open(manifest_path(cache_dir), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    keep = ("schema_version", "model", "tokenizer", "tokenization", "backend", "dataset")
    return {
        "path": os.path.abspath(cache_dir),
        "content_sha256": content_id(manifest),
        "manifest_sha256": digest,
        **{k: manifest.get(k) for k in keep},
    }


