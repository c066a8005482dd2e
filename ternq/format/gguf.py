"""Export to GGUF, llama.cpp's file format: ternary weights as its TQ2_0 / TQ1_0 blocks, the rest in float.

llama.cpp runs ternary models (BitNet b1.58, TriLMs) with two block types of 256 weights and one fp16 scale
``d``: TQ2_0 (2 bits per weight, 66 bytes a block) and TQ1_0 (5 trits per byte, 54 bytes a block). A ternq
weight is ``codes * scale``, so it maps exactly onto those blocks when every block of 256 consecutive weights
of a row shares one scale: one scale per tensor or per row whose length is a multiple of 256, or groups of a
multiple of 256 weights. The scale is rounded to fp16 (the blocks' ``d``), the one inexact step.

The block encoders are written here from llama.cpp's reference (``quantize_row_tq{1,2}_0_ref`` in
``ggml-quants.c``), from integer codes: nothing is re-quantized, so the codes in the file are ternq's codes.
The ``gguf`` package (``pip install gguf``) writes the container.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ExportError
from .atomic import atomic_open
from .torch import _collect_sites

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["export_gguf", "encode_tq1_0", "encode_tq2_0", "BLOCK", "BLOCK_BYTES"]

#: weights per TQ block (llama.cpp's QK_K)
BLOCK = 256
#: bytes per block: TQ2_0 = 64 bytes of 2-bit codes + fp16 d; TQ1_0 = 48 bytes "qs" + 4 bytes "qh" + fp16 d
BLOCK_BYTES = {"TQ2_0": BLOCK // 4 + 2, "TQ1_0": (BLOCK - 4 * BLOCK // 64) // 5 + BLOCK // 64 + 2}

GGUFType = Literal["TQ2_0", "TQ1_0"]


# --- the blocks ---------------------------------------------------------------------------------------------------


def _blocks(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes as (n, 256) trits 0 / 1 / 2 (code + 1) and the scales as fp16 bytes (n, 2), after checking them."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != BLOCK:
        raise ValueError(f"codes of shape {codes.shape}: expected (n_blocks, {BLOCK})")
    if not np.issubdtype(codes.dtype, np.integer) or codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be integers in {-1, 0, 1}")
    with np.errstate(over="ignore"):  # an overflow is refused just below
        d = np.asarray(scales, dtype=np.float32).reshape(-1).astype(np.float16)
    if d.shape[0] != codes.shape[0]:
        raise ValueError(f"{d.shape[0]} scales for {codes.shape[0]} blocks")
    if not np.isfinite(d).all():
        raise ValueError("a scale overflows fp16 (|scale| > 65504): GGUF's TQ blocks store d as fp16")
    return (codes.astype(np.int16) + 1).astype(np.uint8), d.reshape(-1, 1).view(np.uint8)


def encode_tq2_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TQ2_0 blocks (n, 66 bytes) of ternary `codes` (n, 256) with one scale per block (stored as fp16).

    Byte ``32 * j + m`` of a block holds weights ``128 * j + m + 32 * k`` in bits ``2k, 2k + 1`` (k = 0..3),
    each as code + 1; then d. Decodes to exactly ``codes * float16(scale)``.
    """
    q, d = _blocks(codes, scales)
    q = q.reshape(-1, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    qs = np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)
    return np.concatenate([qs, d], axis=1)


def _trits_to_byte(trits: np.ndarray) -> np.ndarray:
    """Base-3 digits along axis -2 (first digit most significant) as one byte: ceil(value * 256 / 243), so that
    llama.cpp reads digit k back as ``((byte * 3**k mod 256) * 3) >> 8`` (a multiply instead of a division)."""
    value = np.zeros(trits.shape[:-2] + trits.shape[-1:], np.uint16)
    for k in range(trits.shape[-2]):
        value = value * 3 + trits[..., k, :]
    return ((value * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TQ1_0 blocks (n, 54 bytes) of ternary `codes` (n, 256) with one scale per block (stored as fp16).

    ``qs`` (48 bytes): byte m < 32 holds weights ``m + 32 k`` (k = 0..4), byte 32 + m < 48 weights
    ``160 + m + 16 k``, five trits each, the first the most significant; ``qh`` (4 bytes): byte j holds weights
    ``240 + j + 4 k`` (k = 0..3) as the four top trits of five; then d. Decodes to exactly
    ``codes * float16(scale)``.
    """
    q, d = _blocks(codes, scales)
    qs0 = _trits_to_byte(q[:, :160].reshape(-1, 5, 32))
    qs1 = _trits_to_byte(q[:, 160:240].reshape(-1, 5, 16))
    top = q[:, 240:].reshape(-1, 4, 4)
    qh = _trits_to_byte(np.concatenate([top, np.zeros_like(top[:, :1])], axis=1))  # a 0 as the 5th trit
    return np.concatenate([qs0, qs1, qh, d], axis=1)


_ENCODERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "TQ2_0": encode_tq2_0, "TQ1_0": encode_tq1_0}


# --- the model ----------------------------------------------------------------------------------------------------

_FIX_NORM = "quantize with TernaryConfig(input_norm=None, ...)"


def _refuse(what: str, why: str, fix: str) -> ExportError:
    return ExportError(f"export_gguf(): {what}: {why}; {fix}")


def _collision(target: str, first: str, second: str) -> ExportError:
    return _refuse(second, f"llama.cpp's tensor {target!r} would also hold {first!r} (its converter's names for "
                   "the same tensor), and one of them would be lost", "export a plain LlamaForCausalLM: rename or "
                   "remove the extra module")


def _check_config(key: str, config: Any, shape: tuple[int, ...], out_dim: int) -> None:
    """Whether llama.cpp's TQ blocks represent this weight exactly (and its inputs as ternq quantizes them)."""
    if config.kind != "ternary":
        raise _refuse(key, f"{config.name} weights have no exact llama.cpp type (only ternary: TQ1_0 / TQ2_0)",
                      "quantize it with TernaryConfig(...) or exclude it")
    if config.input_norm is not None:
        raise _refuse(key, f"input_norm={config.input_norm!r} normalizes the layer's input before quantizing it, "
                      "a layer llama.cpp's Llama graph does not have", _FIX_NORM)
    if config.act_bits not in (None, 8):
        raise _refuse(key, f"act_bits={config.act_bits}: llama.cpp quantizes a TQ layer's inputs to 8 bits",
                      "quantize with act_bits=8 (or None)")
    if len(shape) != 2:
        raise _refuse(key, f"a {len(shape)}-D weight", "export only 2-D (Linear / Embedding) weights quantized")
    if shape[1] % BLOCK:
        raise _refuse(key, f"rows of {shape[1]} weights: a TQ block holds {BLOCK}, and a row is whole blocks",
                      "keep this layer float (exclude it) or use a model whose widths are multiples of 256")
    if config.granularity != "tensor" and out_dim != 0:
        raise _refuse(key, f"per-{config.granularity} scales along dim {out_dim}: a TQ block's scale is per row",
                      "quantize with granularity='tensor'")
    if config.granularity == "group" and config.group_size % BLOCK:
        raise _refuse(key, f"group_size={config.group_size}: one TQ block of {BLOCK} weights has one scale",
                      f"quantize with a group_size that is a multiple of {BLOCK} (or granularity='channel')")


def _block_scales(scale: np.ndarray, shape: tuple[int, int], config: Any) -> np.ndarray:
    """One scale per block of 256 weights, (rows, cols // 256), from ternq's (1,), (rows,) or (rows, groups)."""
    rows, cols = shape
    n = cols // BLOCK
    if config.granularity == "tensor":
        return np.broadcast_to(scale.reshape(1, 1), (rows, n)).copy()
    if config.granularity == "channel":
        return np.repeat(scale.reshape(rows, 1), n, axis=1)
    return np.repeat(scale.reshape(rows, -1), config.group_size // BLOCK, axis=1)[:, :n]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py's ``LlamaModel.permute``): HF rotates the two halves of
    a head (rotate_half), llama.cpp's Llama graph adjacent pairs, so each head's rows are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def _llama_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or not hasattr(model, "lm_head"):
        raise _refuse(type(model).__name__, "not a transformers LlamaForCausalLM (config.model_type 'llama')",
                      "export_gguf writes llama.cpp's 'llama' architecture only; use llama.cpp's "
                      "convert_hf_to_gguf.py for float models of other architectures")
    if config.hidden_act != "silu":
        raise _refuse("config.hidden_act", f"{config.hidden_act!r}: llama.cpp's Llama uses SiLU", "use 'silu'")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise _refuse("config.rope_parameters", f"rope_type {rope.get('rope_type')!r} is not exported",
                      "use the default or linear RoPE")
    return config


def _write_metadata(writer: Any, gguf: Any, config: Any, name: str, qtype: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _write_vocab(writer: Any, gguf: Any, config: Any, tokenizer: Any) -> None:
    """The tokenizer: a Hugging Face fast tokenizer's vocabulary, or a minimal SentencePiece-style one (ids in,
    ids out) for a model without one."""
    if tokenizer is not None:
        _write_hf_vocab(writer, gguf, config, tokenizer)
        return
    n = config.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens, types = tokens[:n], types[:n]
    tokens += [f"<t{i}>" for i in range(len(tokens), n)]
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n)
    writer.add_token_types(types)
    for add, value in ((writer.add_bos_token_id, config.bos_token_id), (writer.add_eos_token_id, config.eos_token_id),
                       (writer.add_pad_token_id, config.pad_token_id)):
        if isinstance(value, int) and 0 <= value < n:
            add(value)
    writer.add_add_bos_token(False)


#: Llama 3's pre-tokenizer split (tokenizer.json), which llama.cpp names "llama-bpe"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name of a byte-level BPE pre-tokenizer: GPT-2's (ByteLevel with its regex) or Llama 3's."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def _write_hf_vocab(writer: Any, gguf: Any, config: Any, tokenizer: Any) -> None:
    """A byte-level BPE fast tokenizer (GPT-2 or Llama 3 pre-tokenization) as llama.cpp's "gpt2" vocabulary."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        raise _refuse(tokenizer.__class__.__name__, "only byte-level BPE fast tokenizers with GPT-2's or Llama 3's "
                      "pre-tokenizer are exported", "pass tokenizer=None (a minimal vocabulary: token ids in, ids "
                      "out) and convert the tokenizer with llama.cpp's convert_hf_to_gguf.py")
    vocab: dict[str, int] = tokenizer.get_vocab()
    n = config.vocab_size
    if max(vocab.values()) >= n:
        raise _refuse("tokenizer", f"token id {max(vocab.values())} >= vocab_size {n}", "pass the model's tokenizer")
    special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token in ((writer.add_bos_token_id, tokenizer.bos_token), (writer.add_eos_token_id, tokenizer.eos_token),
                       (writer.add_pad_token_id, tokenizer.pad_token)):
        if token is not None and token in vocab:
            add(vocab[token])
    writer.add_add_bos_token(False)


def export_gguf(model: nn.Module, path: str | os.PathLike[str], *, type: GGUFType = "TQ2_0",
                float_type: Literal["F32", "F16"] = "F32", tokenizer: Any = None,
                name: str | None = None) -> None:
    """Write a ternq-quantized transformers Llama as a GGUF file that llama.cpp loads and runs.

    Every ternary weight is written as `type` blocks holding its codes and its scale as fp16 (one scale per
    256 weights): dequantized, the file's weights are exactly ternq's ``codes * scale`` up to that fp16
    rounding. Q and K rows are reordered as llama.cpp's converter does. The other tensors (embeddings, norms, a
    float lm_head) are written as `float_type`; 1-D tensors (norms, biases) always as F32.

    Args:
        model: a `LlamaForCausalLM` quantized by `ternq.quantize` (or loaded by `ternq.load_packed`) with
            ternary weights, ``input_norm=None``, one scale per tensor, per row or per group of a multiple of
            256 weights, and rows of a multiple of 256 weights.
        path: the .gguf file to write.
        type: "TQ2_0" (2.06 bits per weight, llama.cpp's faster kernel) or "TQ1_0" (1.69 bits per weight).
        float_type: storage of the float matrices ("F32" or "F16").
        tokenizer: the model's Hugging Face byte-level BPE fast tokenizer, or None for a minimal vocabulary
            (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, placeholders): token ids in, ids out.
        name: ``general.name`` (default: the model's ``config.name_or_path``, a Hub id, or the last part of a
            local directory's path; else "ternq-llama").

    Raises:
        ExportError: the model or a weight's config has no llama.cpp equivalent (the message says why and what
            to change), or the ``gguf`` package is missing; nothing is written then.
    """
    if type not in _ENCODERS:
        raise _refuse(f"type={type!r}", "unknown", f"use one of {sorted(_ENCODERS)}")
    if float_type not in ("F32", "F16"):
        raise _refuse(f"float_type={float_type!r}", "unknown", "use 'F32' or 'F16'")
    try:
        import gguf
    except ImportError as e:
        raise ExportError("export_gguf() needs the gguf package: pip install gguf") from e
    config = _llama_config(model)
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def gguf_name(key: str) -> str | None:
        return names.get_name(key, try_suffixes=(".weight", ".bias"))

    def arrange(key: str, a: np.ndarray) -> np.ndarray:
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute(a, n_head)
        if key.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute(a, n_kv)
        return a

    # everything is checked and encoded before the file is opened: a refusal writes nothing
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    sources: dict[str, str] = {}  # llama.cpp's name -> the model's key written under it
    sites = _collect_sites(model)
    if not sites:
        raise _refuse(model.__class__.__name__, "nothing in it is quantized", "call ternq.quantize(model, ...) first")
    quantized: set[str] = set()
    site_modules = {s.module for s in sites}
    for s in sites:
        shape = tuple(s.codes.shape)
        _check_config(s.key, s.config, shape, s.out_dim)
        keys = sorted({s.key, *s.aliases}, key=lambda k: k != s.key)
        targets = [t for t in map(gguf_name, keys) if t is not None]
        if not targets:
            raise _refuse(s.key, "no llama.cpp tensor has this name", "keep the model's transformers names")
        if "token_embd.weight" in targets:  # tied embedding and lm_head: llama.cpp reuses token_embd
            targets = ["token_embd.weight"]
        if targets[0] in sources:
            raise _collision(targets[0], sources[targets[0]], s.key)
        sources[targets[0]] = s.key
        codes = arrange(s.key, _numpy(s.codes).astype(np.int8))
        scales = arrange(s.key, _block_scales(_numpy(s.scale).astype(np.float32), shape, s.config))  # type: ignore[arg-type]
        if not (np.abs(scales) <= np.finfo(np.float16).max).all():  # NaN too
            raise _refuse(s.key, "a scale is not finite or overflows fp16, the type of a TQ block's d",
                          "keep this layer float")
        blocks = _ENCODERS[type](codes.reshape(-1, BLOCK), scales.reshape(-1))
        tensors[targets[0]] = (blocks.reshape(shape[0], -1), gguf.GGMLQuantizationType[type])
        quantized |= {s.key, *s.aliases, *s.owned}
    state = model.state_dict()
    for key, t in state.items():
        if key in quantized or not t.is_floating_point():
            continue
        target = gguf_name(key)
        if target is None:
            if key.rpartition(".")[0] in site_modules:  # a packed layer's own buffers
                continue
            raise _refuse(key, "no llama.cpp tensor has this name", "export a plain LlamaForCausalLM")
        if target == "output.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reads token_embd for a missing output
        if target in sources:
            first = state.get(sources[target])
            if first is not None and (first.data_ptr(), first.shape) == (t.data_ptr(), t.shape):
                continue  # a tied parameter, under both of its names
            raise _collision(target, sources[target], key)
        sources[target] = key
        a = arrange(key, _numpy(t))
        dtype = np.float16 if float_type == "F16" and a.ndim > 1 else np.float32
        tensors[target] = (a.astype(dtype), None)

    name = name or _model_name(getattr(config, "name_or_path", "")) or "ternq-llama"
    _check_seekable(path)
    writer = gguf.GGUFWriter(None, "llama")  # holds the metadata in memory; writes to the file given below
    _write_metadata(writer, gguf, config, name, type)
    _write_vocab(writer, gguf, config, tokenizer)
    for target, (a, raw) in tensors.items():
        writer.add_tensor(target, a, raw_dtype=raw)
    # by ternq's rules for output files (ternq.format.atomic): a temporary file renamed over a regular one (its
    # mode and owner kept, a symlink followed), a character device written through, never replaced
    with atomic_open(path) as f:
        if not f.seekable():  # a terminal: gguf's writer and numpy's tofile need file positions
            raise _refuse(os.fspath(path), "cannot be written by seeking (a terminal or a pipe); the GGUF writer "
                          "needs file positions", "write to a file, then copy it")
        # the writer opens files by name only: given this one as its open output (gguf >= 0.10's fields, which
        # open_output_file sets), it writes the header, metadata and tensors into it
        writer.fout, writer.state = [f], gguf.WriterState.EMPTY
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.flush()
        finally:
            writer.fout = None  # atomic_open closes (and renames) its file


def _model_name(name_or_path: str) -> str:
    """A name for ``general.name`` from transformers' ``name_or_path``: a Hub id as it is, a local directory by its
    last part (the file is shared; the exporting machine's paths are not its business, as in `export_onnx`)."""
    if not isinstance(name_or_path, str):
        return ""
    if os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path))
    return name_or_path


def _check_seekable(path: str | os.PathLike[str]) -> None:
    """Refuse a FIFO (or a pipe named by /dev/stdout) before opening it, which would wait for its reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a new file, or an error atomic_open reports with the path
    if stat.S_ISFIFO(mode):
        raise _refuse(os.fspath(path), "is a FIFO (named pipe); a GGUF file is written with seeks",
                      "write to a file, then copy it into the pipe")
