"""ternq.export_gguf: llama.cpp's TQ1_0 / TQ2_0 blocks hold exactly ternq's ternary weights.

The reference is llama.cpp's own Python port of its (de)quantization, ``gguf.quants`` (``dequantize_row_tq*`` and
``quantize_row_tq*_ref`` of ggml-quants.c): our encoders are checked against it block by block, and a quantized
random Llama is exported, read back with ``gguf.GGUFReader`` and dequantized. Exact means: codes * scale with the
scale rounded to fp16 (a TQ block's ``d`` is fp16; ternq's scales are float32), and bit-identical codes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ternq
from ternq.format.gguf import BLOCK, BLOCK_BYTES, encode_tq1_0, encode_tq2_0

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ENCODERS = {"TQ1_0": encode_tq1_0, "TQ2_0": encode_tq2_0}
TYPES = sorted(ENCODERS)


def reference_dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])


# --- the block encoders ---------------------------------------------------------------------------------------


trits = st.integers(1, 4).flatmap(lambda n: arrays(np.int8, (n, BLOCK), elements=st.integers(-1, 1)))
# positive scales, fp16 subnormals (below 2**-14) included: d holds them with less precision, still exactly
scales_for = st.floats(2.0**-20, 6e4, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=60, deadline=None)
@given(codes=trits, data=st.data())
def test_blocks_decode_to_codes_times_fp16_scale(qtype, codes, data):
    """Round trip through llama.cpp's reference dequantization: exactly codes * float16(scale)."""
    scales = np.array([data.draw(scales_for) for _ in range(len(codes))], np.float32)
    blocks = ENCODERS[qtype](codes, scales)
    assert blocks.dtype == np.uint8 and blocks.shape == (len(codes), BLOCK_BYTES[qtype])
    expected = codes.astype(np.float32) * scales.astype(np.float16).astype(np.float32)[:, None]
    np.testing.assert_array_equal(reference_dequantize(blocks, qtype), expected)


@pytest.mark.parametrize("qtype", TYPES)
@settings(max_examples=40, deadline=None)
@given(codes=trits, data=st.data())
def test_blocks_are_the_reference_encoders_bytes(qtype, codes, data):
    """Byte for byte what llama.cpp's quantize_row_tq*_ref writes for the weights codes * d, when d is the
    block's absmax (the reference takes d = max|x|, so a block needs a nonzero code for the two to agree)."""
    codes[:, data.draw(st.integers(0, BLOCK - 1))] = data.draw(st.sampled_from([-1, 1]))
    d = np.array([data.draw(scales_for) for _ in range(len(codes))], np.float32).astype(np.float16)
    weights = codes.astype(np.float32) * d.astype(np.float32)[:, None]
    reference = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(ENCODERS[qtype](codes, d), reference)


@pytest.mark.parametrize("qtype", TYPES)
def test_encoders_refuse_what_a_block_cannot_hold(qtype):
    encode = ENCODERS[qtype]
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        encode(np.full((1, BLOCK), 2, np.int8), np.ones(1))
    with pytest.raises(ValueError, match="expected \\(n_blocks, 256\\)"):
        encode(np.zeros((1, 128), np.int8), np.ones(1))
    with pytest.raises(ValueError, match="overflows fp16"):
        encode(np.zeros((1, BLOCK), np.int8), np.array([1e6]))


# --- a quantized Llama ---------------------------------------------------------------------------------------------


def tiny_llama(hidden: int = 256, tie: bool = False, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=tie, **config)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantized_llama(tie: bool = False, **config) -> torch.nn.Module:
    return ternq.quantize(tiny_llama(tie=tie), config=ternq.TernaryConfig(input_norm=None, **config))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row order (each head's rows interleaved from its two rotary halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def fp16_weight(module: torch.nn.Module) -> np.ndarray:
    """ternq's weight as codes * float16(scale), per tensor / row / group as the config says."""
    codes, scale = module.weight_codes()
    half = scale.half().float()
    if scale.dim() == 2:  # groups
        half = half.repeat_interleave(module.qconfig.group_size, dim=1)[:, :codes.shape[1]]
    elif scale.numel() > 1:
        half = half[:, None]
    return (codes.float() * half).numpy()


def expected_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GGUF name -> ternq's weight as codes * float16(scale)."""
    out = {f"blk.{i}.{name}.weight": fp16_weight(layer.get_submodule(path))
           for i, layer in enumerate(model.model.layers) for path, name in GGUF_NAMES.items()}
    out["output.weight"] = fp16_weight(model.lm_head)
    return out


def read_back(path) -> tuple[dict[str, np.ndarray], dict[str, str], object]:
    reader = gguf.GGUFReader(path)
    weights, types = {}, {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        weights[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
    return weights, types, reader


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("qtype,granularity", [("TQ2_0", "tensor"), ("TQ1_0", "tensor"), ("TQ2_0", "channel"),
                                               ("TQ1_0", "group")])
def test_exported_llama_holds_ternqs_ternary_weights(tmp_path, one_thread, qtype, granularity):
    extra = {"group_size": 256} if granularity == "group" else {}
    model = quantized_llama(granularity=granularity, **extra)
    path = tmp_path / "model.gguf"
    ternq.export_gguf(model, path, type=qtype)
    weights, types, reader = read_back(path)
    expected = expected_weights(model)
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for name, want in expected.items():
        assert types[name] == qtype, name
        got = weights[name]
        if ".attn_q." in name:
            got = unpermute(got, n_head)
        elif ".attn_k." in name:
            got = unpermute(got, n_kv)
        np.testing.assert_array_equal(got, want, err_msg=name)
    # within fp16 rounding of the weight the QAT model computes with
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(unpermute(weights["blk.1.attn_q.weight"], n_head), q, rtol=2**-11, atol=0)
    # the float tensors as they are
    state = model.state_dict()
    np.testing.assert_array_equal(weights["token_embd.weight"], state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(weights["output_norm.weight"], state["model.norm.weight"].numpy())
    np.testing.assert_array_equal(weights["blk.0.attn_norm.weight"],
                                  state["model.layers.0.input_layernorm.weight"].numpy())
    assert types["token_embd.weight"] == "F32" and types["blk.0.ffn_norm.weight"] == "F32"
    assert len(weights) == 2 * 9 + 3
    # the hyperparameters llama.cpp builds the graph from
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 256
    assert field(reader, "llama.feed_forward_length") == 512
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == 64
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    assert len(field(reader, "tokenizer.ggml.tokens")) == 320


def test_permutation_is_llama_cpps(one_thread):
    """The Q/K reorder is convert_hf_to_gguf.py's LlamaModel.permute: rows (h, 2, d/2) -> (h, d/2, 2)."""
    from ternq.format.gguf import _permute

    rows = np.arange(16)
    assert _permute(rows, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    np.testing.assert_array_equal(unpermute(_permute(rows, 2), 2), rows)


def test_tied_embedding(tmp_path, one_thread):
    """A tied lm_head ternq quantizes computes with its codes while the embedding lookup reads the float tensor:
    two tensors in the file. Kept float, the tie stays one tensor (llama.cpp reads token_embd for a missing
    output)."""
    model = quantized_llama(tie=True)
    ternq.export_gguf(model, tmp_path / "tied.gguf", type="TQ2_0")
    weights, types, _ = read_back(tmp_path / "tied.gguf")
    assert types["output.weight"] == "TQ2_0" and types["token_embd.weight"] == "F32"
    np.testing.assert_array_equal(weights["output.weight"], fp16_weight(model.lm_head))
    np.testing.assert_array_equal(weights["token_embd.weight"], model.state_dict()["model.embed_tokens.weight"])

    model = ternq.quantize(tiny_llama(tie=True), exclude=["lm_head"], config=ternq.TernaryConfig(input_norm=None))
    ternq.export_gguf(model, tmp_path / "float-head.gguf", type="TQ2_0")
    weights, types, _ = read_back(tmp_path / "float-head.gguf")
    assert "output.weight" not in weights and types["token_embd.weight"] == "F32"


def test_packed_model_exports_the_same_file(tmp_path, one_thread):
    model = quantized_llama()
    ternq.export_gguf(model, tmp_path / "qat.gguf", type="TQ1_0", float_type="F16")
    ternq.save_packed(model, tmp_path / "model.safetensors")
    packed = ternq.load_packed(tmp_path / "model.safetensors", tiny_llama())
    ternq.export_gguf(packed, tmp_path / "packed.gguf", type="TQ1_0", float_type="F16")
    assert (tmp_path / "qat.gguf").read_bytes() == (tmp_path / "packed.gguf").read_bytes()
    _, types, _ = read_back(tmp_path / "packed.gguf")
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"


def bpe_tokenizer(vocab_size: int = 300):
    """A small byte-level BPE tokenizer (GPT-2's pre-tokenization), trained here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, hello there"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_hf_tokenizer_is_written(tmp_path, one_thread):
    tokenizer = bpe_tokenizer()
    ternq.export_gguf(quantized_llama(), tmp_path / "tok.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(tmp_path / "tok.gguf")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == 320 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 320)]
    assert field(reader, "tokenizer.ggml.merges")[0] == "h e"
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["the"]] == gguf.TokenType.NORMAL


def test_pre_tokenizer_names_are_llama_cpps():
    """tokenizer.json's pre_tokenizer -> llama.cpp's tokenizer.ggml.pre (the names its llama-vocab.cpp knows)."""
    from ternq.format.gguf import _pre_tokenizer

    llama3 = {"type": "Sequence", "pretokenizers": [  # Meta-Llama-3's tokenizer.json, verbatim
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                               "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                               "\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert _pre_tokenizer(llama3) == "llama-bpe"
    assert _pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    assert _pre_tokenizer({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}) is None
    assert _pre_tokenizer({"type": "Whitespace"}) is None


def test_refuses_other_tokenizers(tmp_path, one_thread):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(ternq.ExportError, match="only byte-level BPE.*tokenizer=None"):
        ternq.export_gguf(quantized_llama(), tmp_path / "x.gguf", tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


# --- what llama.cpp cannot represent is refused, and nothing is written ------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: ternq.quantize(tiny_llama()), r"input_norm='layernorm'.*TernaryConfig\(input_norm=None"),
    (lambda: quantized_llama(act_bits=4), r"act_bits=4"),
    (lambda: quantized_llama(granularity="group", group_size=128), r"group_size=128.*multiple of 256"),
    (lambda: ternq.quantize(tiny_llama(), config=ternq.KBitConfig(bits=4, input_norm=None)),
     r"int4 weights have no exact llama.cpp type"),
    (lambda: ternq.quantize(tiny_llama(hidden=192), config=ternq.TernaryConfig(input_norm=None)),
     r"rows of 192 weights.*256"),
    (lambda: tiny_llama(), r"nothing in it is quantized.*ternq.quantize"),
    (lambda: tiny_llama(hidden_act="gelu"), r"hidden_act.*SiLU"),
])
def test_refusals_say_why_and_write_nothing(tmp_path, one_thread, make, match):
    path = tmp_path / "model.gguf"
    with pytest.raises(ternq.ExportError, match=match):
        ternq.export_gguf(make(), path)
    assert os.listdir(tmp_path) == []


def test_refuses_other_architectures(tmp_path, one_thread):
    cfg = transformers.GPT2Config(n_embd=256, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    model = ternq.quantize(transformers.GPT2LMHeadModel(cfg).eval(), config=ternq.TernaryConfig(input_norm=None))
    with pytest.raises(ternq.ExportError, match="not a transformers LlamaForCausalLM"):
        ternq.export_gguf(model, tmp_path / "gpt2.gguf")
    with pytest.raises(ternq.ExportError, match="type='Q4_0': unknown"):
        ternq.export_gguf(quantized_llama(), tmp_path / "x.gguf", type="Q4_0")
    assert os.listdir(tmp_path) == []


# --- llama.cpp runs the file (llama-cpp-python, the `bench` extra: it builds llama.cpp from source) ---------------


def greedy(step, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    logits = step(prompt)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = step([out[-1]])
    return out


def test_llama_cpp_matches_ternq(tmp_path, one_thread):
    """llama.cpp's logits on the exported model against ternq's packed model's, and their greedy tokens.

    Not equal: llama.cpp quantizes each layer's input to int8 per block of 256 features (Q8_K), ternq per token;
    the weights are the same up to fp16 scale rounding. Measured (x86-64 AVX-512, llama-cpp-python 0.3.36):
    logits correlation 0.9999, max |difference| 1.8 % of max |logit|, 16 of 16 greedy tokens equal, for both
    types; the test asks for 0.999 and the first 8 tokens. Without the Q/K permutation the correlation is 0.90
    and the first greedy token differs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_llama()
    with torch.no_grad():  # sharp attention, so that the Q/K row order matters (a random init's is near uniform)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
    model = ternq.quantize(model, config=ternq.TernaryConfig(input_norm=None))
    ternq.save_packed(model, tmp_path / "model.safetensors")
    packed = ternq.load_packed(tmp_path / "model.safetensors", tiny_llama())
    prompt = [1, 17, 42, 99, 7, 250, 3, 64]
    ids: list[int] = []

    def ternq_step(new: list[int]) -> np.ndarray:  # the whole sequence again: no cache to get wrong
        ids.extend(new)
        with torch.no_grad():
            return packed(torch.tensor([ids])).logits[0, -1].numpy()

    with torch.no_grad():
        want = packed(torch.tensor([prompt])).logits[0].numpy()
    want_tokens = greedy(ternq_step, prompt, 16)
    for qtype in TYPES:
        path = tmp_path / f"model-{qtype}.gguf"
        ternq.export_gguf(model, path, type=qtype, tokenizer=bpe_tokenizer())
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False)
        llm.eval(prompt)
        got = np.array(llm.scores[:len(prompt)])
        corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
        rel = np.abs(got - want).max() / np.abs(want).max()

        def cpp_step(new: list[int], llm=llm) -> np.ndarray:
            llm.eval(new)
            return np.array(llm.scores[llm.n_tokens - 1])

        llm.reset()
        tokens = greedy(cpp_step, prompt, 16)
        print(f"{qtype}: logits correlation {corr:.5f}, max |diff| / max |logit| {rel:.4f}, "
              f"greedy tokens {tokens} vs ternq {want_tokens}")
        assert corr > 0.999, (qtype, corr)
        assert tokens[:8] == want_tokens[:8], (qtype, tokens, want_tokens)
        # the tokenizer: llama.cpp splits text as the Hugging Face tokenizer does
        text = "hello the quick fox, jumps over there"
        assert llm.tokenize(text.encode(), add_bos=False) == bpe_tokenizer().encode(text)


# --- the output path: ternq's rules for output files (ternq.format.atomic), as every other writer ----------------


@pytest.fixture(scope="module")
def small_llama():
    torch.set_num_threads(1)
    return quantized_llama()


def test_output_follows_ternqs_rules_for_files(tmp_path, small_llama):
    # before: the GGUF writer opened `<path>.<pid>.partial` by name (following a link planted there) and renamed
    # it over `path`, so a symlink became a regular file, an existing file's mode went back to the umask's, and
    # a name near the file system's limit failed on the temporary name
    (tmp_path / "victim").write_bytes(b"not yours")
    os.symlink(tmp_path / "victim", tmp_path / f"planted.gguf.{os.getpid()}.partial")
    ternq.export_gguf(small_llama, tmp_path / "planted.gguf")
    assert (tmp_path / "victim").read_bytes() == b"not yours"
    assert not (tmp_path / "planted.gguf").is_symlink()

    (tmp_path / "private.gguf").write_bytes(b"old")
    os.chmod(tmp_path / "private.gguf", 0o600)
    os.symlink("private.gguf", tmp_path / "link.gguf")
    ternq.export_gguf(small_llama, tmp_path / "link.gguf")
    assert (tmp_path / "link.gguf").is_symlink() and os.stat(tmp_path / "private.gguf").st_mode & 0o777 == 0o600
    assert len(read_back(tmp_path / "private.gguf")[0]) == 21

    long = tmp_path / ("x" * 250 + ".gguf")
    ternq.export_gguf(small_llama, long)
    assert long.read_bytes() == (tmp_path / "private.gguf").read_bytes()

    os.symlink(os.devnull, tmp_path / "discard.gguf")  # a character device is written through, never replaced
    ternq.export_gguf(small_llama, tmp_path / "discard.gguf")
    assert os.readlink(tmp_path / "discard.gguf") == os.devnull
    assert sorted(os.listdir(tmp_path)) == sorted(["victim", f"planted.gguf.{os.getpid()}.partial", "planted.gguf",
                                                   "private.gguf", "link.gguf", long.name, "discard.gguf"])


def test_a_fifo_is_refused_before_it_is_opened(tmp_path, small_llama):
    # before: the FIFO was replaced by a regular file (now: refused without waiting for a reader)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ternq.ExportError, match="pipe: is a FIFO.*write to a file"):
        ternq.export_gguf(small_llama, tmp_path / "pipe")
    assert os.path.exists(tmp_path / "pipe") and not os.path.isfile(tmp_path / "pipe")


def test_a_nan_scale_is_refused_as_not_finite(tmp_path, small_llama):
    # before: refused as "overflows fp16", which a NaN does not
    ternq.save_packed(small_llama, tmp_path / "model.safetensors")
    packed = ternq.load_packed(tmp_path / "model.safetensors", tiny_llama())
    packed.model.layers[0].mlp.up_proj.scale.fill_(float("nan"))
    with pytest.raises(ternq.ExportError, match="up_proj.weight: a scale is not finite"):
        ternq.export_gguf(packed, tmp_path / "nan.gguf")
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_two_tensors_under_one_llama_cpp_name_are_refused(tmp_path):
    # llama.cpp's converter knows several names for a tensor (Meta's `layers.N.attention.wq`, GPT-2's
    # `transformer.ln_f`, ...); a model holding one beside the transformers name lost one of the two silently
    # before (a quantized one overwrote the other, a float one was skipped)
    model = tiny_llama()
    model.model.layers[0].attention = torch.nn.Module()
    model.model.layers[0].attention.wq = torch.nn.Linear(256, 256, bias=False)
    model = ternq.quantize(model, config=ternq.TernaryConfig(input_norm=None))
    with pytest.raises(ternq.ExportError, match=r"attention.wq.weight: llama.cpp's tensor 'blk.0.attn_q.weight' "
                                                r"would also hold 'model.layers.0.self_attn.q_proj.weight'"):
        ternq.export_gguf(model, tmp_path / "x.gguf")
    model = tiny_llama()
    model.transformer = torch.nn.Module()
    model.transformer.ln_f = torch.nn.LayerNorm(256)
    model = ternq.quantize(model, config=ternq.TernaryConfig(input_norm=None))
    with pytest.raises(ternq.ExportError, match=r"transformer.ln_f.weight: llama.cpp's tensor 'output_norm.weight' "
                                                r"would also hold 'model.norm.weight'"):
        ternq.export_gguf(model, tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


def test_a_local_directory_names_the_model_by_its_last_part(tmp_path, small_llama):
    # before: general.name was config.name_or_path as it was, the exporting machine's full path when the model
    # was loaded from a local directory
    small_llama.config.name_or_path = str(tmp_path / "home" / "someone" / "my-llama")
    ternq.export_gguf(small_llama, tmp_path / "local.gguf")
    assert field(read_back(tmp_path / "local.gguf")[2], "general.name") == "my-llama"
    small_llama.config.name_or_path = "org/model-id"  # a Hub id stays whole
    ternq.export_gguf(small_llama, tmp_path / "hub.gguf")
    assert field(read_back(tmp_path / "hub.gguf")[2], "general.name") == "org/model-id"
    assert str(tmp_path).encode() not in (tmp_path / "local.gguf").read_bytes()
