"""Identity of a model and a tokenizer, as stored in a cache manifest.

Stage 2 compares a policy against a cache with these: `model_identity(policy_dir)["sha256"]` against
`manifest["model"]["sha256"]`, and `tokenizer_identity(policy_dir)` against `manifest["tokenizer"]`
(`identity_diff` lists the differing keys). Paths are informative only; hashes decide.
"""

import hashlib
import json
import re
from pathlib import Path

from refcache_base import UserError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
COMPARED_KEYS = {"model": ("sha256",), "tokenizer": ("sha256", "chat_template_sha256")}


def resolve_model_dir(model) -> Path:
    """A local model directory, or a hub id already in the local Hugging Face cache (no downloads)."""
    p = Path(model)
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(model), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached locally, for whatever reason
            raise UserError(f"{model}: no such directory, and not a model in the local Hugging Face cache") from None
    if not p.is_dir():
        raise UserError(f"{model}: not a model directory")
    if not (p / "config.json").is_file():
        raise UserError(f"{model}: not a model directory (no config.json)")
    if not _weight_files(p):
        raise UserError(f"{model}: not a model directory (no *.safetensors or *.bin weights)")
    return p


def _weight_files(d: Path):
    return sorted({f for pat in WEIGHT_PATTERNS for f in d.glob(pat) if f.is_file()})


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _combined(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _revision(d: Path):
    """The commit when the directory is a Hugging Face cache snapshot (.../snapshots/<sha>/)."""
    parts = d.resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def model_identity(model_dir) -> dict:
    """{path, revision, sha256, files}: sha256 over config.json and the weight files (name -> file sha256)."""
    d = resolve_model_dir(model_dir)
    files = {f.name: file_sha256(f) for f in [d / "config.json", *_weight_files(d)]}
    return {"path": str(d.resolve()), "revision": _revision(d), "sha256": _combined(files), "files": files}


def chat_template(d: Path):
    """The chat template text as stored with the tokenizer (file or tokenizer_config.json), or None."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        return json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    return None


def tokenizer_identity(model_dir) -> dict:
    """{path, sha256, files, chat_template_sha256}: sha256 over the tokenizer files, and of the chat template."""
    d = resolve_model_dir(model_dir)
    files = {n: file_sha256(d / n) for n in TOKENIZER_FILES if (d / n).is_file()}
    if not files:
        raise UserError(f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    tmpl = chat_template(d)
    tmpl_sha = None if tmpl is None else hashlib.sha256(
        (tmpl if isinstance(tmpl, str) else json.dumps(tmpl, sort_keys=True)).encode()).hexdigest()
    return {"path": str(d.resolve()), "sha256": _combined(files), "files": files, "chat_template_sha256": tmpl_sha}


def identity_diff(cached: dict, current: dict, what: str) -> list[str]:
    """Keys (of COMPARED_KEYS[what]) whose values differ, e.g. ['sha256']."""
    return [k for k in COMPARED_KEYS[what] if cached.get(k) != current.get(k)]
