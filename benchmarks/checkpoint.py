"""A llama-like checkpoint as real ones are laid out: 4 safetensors shards with
``model.safetensors.index.json``, ``config.json``, a 4 MB ``tokenizer.json`` and its companions;
F16 weights, F32 norms and rotary frequencies, an I64 buffer (numpy has no BF16, and the vLLM
loader reads through safetensors' numpy framework). The shape is TinyLlama's (22 layers,
32,000 tokens, 8 query heads per key/value head) with the hidden size picked to come nearest
the size asked: 2048 gives 2.05 GiB. Tensor bytes are random (seeded), as weights are to a
compressor."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np

LAYERS, VOCAB, SHARDS = 22, 32_000, 4
DTYPES = {"F16": 2, "F32": 4, "I64": 8}


def tensors(hidden: int) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of every tensor, in the model's order."""
    inter, kv = (hidden * 11 // 4 + 63) // 64 * 64, hidden // 8
    out = [("model.embed_tokens.weight", "F16", [VOCAB, hidden])]
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", "F16", [hidden, hidden]), (p + "self_attn.k_proj.weight", "F16", [kv, hidden]),
                (p + "self_attn.v_proj.weight", "F16", [kv, hidden]), (p + "self_attn.o_proj.weight", "F16", [hidden, hidden]),
                (p + "self_attn.rotary_emb.inv_freq", "F32", [32]),
                (p + "mlp.gate_proj.weight", "F16", [inter, hidden]), (p + "mlp.up_proj.weight", "F16", [inter, hidden]),
                (p + "mlp.down_proj.weight", "F16", [hidden, inter]),
                (p + "input_layernorm.weight", "F32", [hidden]), (p + "post_attention_layernorm.weight", "F32", [hidden])]
    out += [("model.norm.weight", "F32", [hidden]), ("model.position_ids", "I64", [1, 2048]),
            ("lm_head.weight", "F16", [VOCAB, hidden])]
    return out


def nbytes(dtype: str, shape: list[int]) -> int:
    return DTYPES[dtype] * int(np.prod(shape))


def hidden_for(size: int) -> int:
    """The hidden size (a multiple of 64) whose checkpoint comes nearest ``size`` bytes."""
    return min(range(64, 8192, 64), key=lambda h: abs(sum(nbytes(d, s) for _, d, s in tensors(h)) - size))


def write(directory: Path, size: int, seed: int = 23) -> int:
    """Write the checkpoint into ``directory``; its total bytes."""
    hidden = hidden_for(size)
    layout = tensors(hidden)
    total = sum(nbytes(d, s) for _, d, s in layout)
    rng = np.random.default_rng(seed)
    shards: list[list[tuple[str, str, list[int]]]] = [[] for _ in range(SHARDS)]
    done = 0
    for name, dtype, shape in layout:  # contiguous, by bytes, as save_pretrained splits
        shards[min(SHARDS - 1, done * SHARDS // total)].append((name, dtype, shape))
        done += nbytes(dtype, shape)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
        write_shard(directory / filename, shard, rng)
        weight_map.update({name: filename for name, _, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": (hidden * 11 // 4 + 63) // 64 * 64, "num_hidden_layers": LAYERS,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 512),
        "vocab_size": VOCAB, "torch_dtype": "float16", "rms_norm_eps": 1e-5}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "tokenizer.json").write_text(tokenizer_json(4_000_000, seed))
    return sum(path.stat().st_size for path in directory.iterdir())


def write_shard(path: Path, shard: list[tuple[str, str, list[int]]], rng: np.random.Generator) -> None:
    """The layout safetensors' own writer makes: tensors ordered by dtype (widest first), then name."""
    ordered = sorted(shard, key=lambda t: (-DTYPES[t[1]], t[0]))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in ordered:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes(dtype, shape)]}
        offset += nbytes(dtype, shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for dtype, shape in ((d, s) for _, d, s in ordered):
            left = nbytes(dtype, shape)
            while left:
                step = min(left, 64 << 20)
                out.write(rng.bytes(step))
                left -= step


def tokenizer_json(size: int, seed: int) -> str:
    """A BPE tokenizer.json of about ``size`` bytes: vocabulary and merges."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz\u0120"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    while len(vocab) < VOCAB:
        vocab.setdefault("".join(rng.choices(letters, k=rng.randrange(2, 9))), len(vocab))
    merges: list[str] = []
    body = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    length = len(json.dumps(body))
    while length < size:
        merge = "".join(rng.choices(letters, k=rng.randrange(1, 6))) + " " + "".join(rng.choices(letters, k=rng.randrange(1, 6)))
        merges.append(merge)
        length += len(json.dumps(merge)) + 2
    return json.dumps(body)


GGUF_TYPES = {"F32": 0, "F16": 1}
GGUF_ALIGNMENT = 32


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, size: int, seed: int = 23) -> int:
    """One GGUF v3 file of the same model (F16 weights, F32 norms; GGUF has no I64 buffer), its
    32,000-token vocabulary in the header as real ones carry it; its size."""
    hidden = hidden_for(size)
    layout = [(name, dtype, shape) for name, dtype, shape in tensors(hidden) if dtype in GGUF_TYPES]
    rng = random.Random(seed)
    tokens = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 9))) for _ in range(VOCAB)]
    meta = (gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
            + gguf_string("llama.block_count") + struct.pack("<II", 4, LAYERS)
            + gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(tokens))
            + b"".join(gguf_string(token) for token in tokens))
    infos, offset = b"", 0
    for name, dtype, shape in layout:
        offset += -offset % GGUF_ALIGNMENT
        infos += gguf_string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        infos += struct.pack("<IQ", GGUF_TYPES[dtype], offset)
        offset += nbytes(dtype, shape)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(layout), 3) + meta + infos
    head += b"\0" * (-len(head) % GGUF_ALIGNMENT)
    data = np.random.default_rng(seed)
    with open(path, "wb") as out:
        out.write(head)
        written = 0
        for _, dtype, shape in layout:
            out.write(b"\0" * (-written % GGUF_ALIGNMENT))
            written += -written % GGUF_ALIGNMENT
            left = nbytes(dtype, shape)
            written += left
            while left:
                step = min(left, 64 << 20)
                out.write(data.bytes(step))
                left -= step
    return path.stat().st_size
