"""Export a checkpoint as one GGUF file, so the model runs in llama.cpp and Ollama.

The file holds what llama.cpp's own converter (`convert_hf_to_gguf.py`, its Qwen2 model) writes for a
Qwen2 model: the `qwen2` hyperparameters, the weights under GGUF tensor names (biases and norms in
f32, matrices in the chosen type), and the byte-level BPE vocabulary with its merges, token types,
special ids and chat template. Unlike that converter, it needs no known pre-tokenizer hash: every
qwenkit vocabulary (official or trained) splits text with Qwen's regex, which is llama.cpp's "qwen2"
pre-tokenizer, so models with a qwenkit-trained vocabulary export too.

Weights are converted one tensor at a time while the file is written, so memory stays near the model's
own size. qwenkit's dynamic NTK and LogN scaling only act beyond the training length, which llama.cpp
does not extend the same way: within `max_position_embeddings` the exported model computes the same
function.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from qwenkit.chatml import CHAT_TEMPLATE
from qwenkit.checkpoint import DTYPES, load, read_config_json, tensor_shapes, weight_files
from qwenkit.errors import QwenkitError
from qwenkit.hf_tokenizer import bytes_to_unicode, tokenizer_json
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer

# --type -> (the file's general.file_type, the type of its 2-D weight matrices)
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
NUMPY_TYPES = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


def export_gguf(
    path: str | os.PathLike, out: str | os.PathLike, type: str = "f16", progress: bool = False
) -> Path:
    """Write the checkpoint at `path` (either layout) as the GGUF file `out`; returns its path.

    `type`: f32, f16 or q8_0 for the weight matrices (norms and biases stay f32, as llama.cpp keeps
    them). Written beside `out` and renamed at the end, so a failure leaves no partial file.
    """
    if type not in GGUF_TYPES:
        raise QwenkitError(f"unknown GGUF type {type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    read_config_json(path)  # a clear error for a path that is not a checkpoint
    # Load in the weights' own float dtype (every conversion to the file's types is then exact) rather
    # than float32, which would double a bfloat16 model's memory.
    floats = {dtype for _, dtype in tensor_shapes(weight_files(Path(path))).values() if dtype in DTYPES}
    model, tokenizer = load(path, dtype=floats.pop() if len(floats) == 1 else "float32")
    c = model.config
    if c.use_window_attn and min(c.layer_window_sizes()) < c.max_position_embeddings:
        raise QwenkitError(
            "this model attends through windows shorter than its training length "
            f"({min(c.layer_window_sizes())} < {c.max_position_embeddings}), which llama.cpp cannot run"
        )
    file_type, matrix_type = GGUF_TYPES[type]
    target = Path(out)
    if target.is_dir():
        raise QwenkitError(f"{target} is a directory; give the path of the .gguf file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
        add_hyperparameters(writer, model, Path(path).resolve().name, file_type)
        add_vocabulary(writer, tokenizer, model, Path(path))
        plan = [(name, tensor, ggml_type(name, tensor, matrix_type)) for name, tensor in gguf_tensors(model)]
        for name, tensor, qtype in plan:
            shape = (
                gguf.quant_shape_to_byte_shape(tensor.shape, qtype)
                if qtype not in NUMPY_TYPES
                else tensor.shape
            )
            numpy_type = NUMPY_TYPES.get(qtype, np.uint8)
            nbytes = int(np.prod(shape)) * np.dtype(numpy_type).itemsize
            writer.add_tensor_info(name, shape, np.dtype(numpy_type), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress(sum(t.numel() for _, t, _ in plan), progress)
        for _, tensor, qtype in plan:
            writer.write_tensor_data(encode(tensor, qtype))
            bar.update(tensor.numel())
        bar.close()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp makes 0o600
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def add_hyperparameters(writer: gguf.GGUFWriter, model: Qwen, name: str, file_type: int) -> None:
    """The `general.*` and `qwen2.*` keys llama.cpp reads to build the network."""
    c = model.config
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer: Tokenizer, model: Qwen, directory: Path) -> None:
    """Byte-level BPE as llama.cpp's "gpt2" tokenizer model: tokens as in tokenizer.json (bytes mapped
    to printable characters), added tokens as text, merges, token types and the special ids.

    Ids the embedding has beyond the tokenizer (Qwen pads 151,851 ids to 151,936 rows) become
    "[PAD{id}]" tokens of type unused, as llama.cpp's converter writes them.
    """
    tokens, types, merges = vocabulary(tokenizer, model.config.vocab_size, directory)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = _eos_id(tokenizer, model)
    bos_name = getattr(tokenizer, "bos_token", None)
    writer.add_bos_token_id(tokenizer.special_tokens[bos_name] if bos_name else tokenizer.eod_id)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)


def vocabulary(
    tokenizer: Tokenizer, rows: int, directory: Path | None = None
) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges "a b") for `rows` embedding rows, from the tokenizer's
    tokenizer.json form: the checkpoint's own file when it holds exactly the tokenizer's tokens (as
    llama.cpp's converter reads it), else the one qwenkit derives (seconds for 151k merges)."""
    if tokenizer.vocab_size > rows:
        raise QwenkitError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {rows} embedding rows"
        )
    hf = _matching_tokenizer_json(tokenizer, directory) or json.loads(tokenizer_json(tokenizer))
    tokens: list[str | None] = [None] * rows
    types = [gguf.TokenType.UNUSED] * rows
    for text, token_id in hf["model"]["vocab"].items():
        tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in hf["added_tokens"]:
        special = added["special"]
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    names = [text if text is not None else f"[PAD{i}]" for i, text in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    if not merges:  # the gguf package cannot write an empty array, and llama.cpp requires the key
        raise QwenkitError("this vocabulary has no BPE merges (single bytes only); llama.cpp needs merges")
    return names, [int(t) for t in types], merges


def _matching_tokenizer_json(tokenizer: Tokenizer, directory: Path | None) -> dict | None:
    """The directory's tokenizer.json contents if its vocabulary and added tokens are exactly the
    tokenizer's (same bytes under the same ids), else None."""
    file = directory / "tokenizer.json" if directory is not None else None
    if file is None or not file.is_file():
        return None
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
        vocab, added = hf["model"]["vocab"], hf["added_tokens"]
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        same_vocab = len(vocab) == tokenizer.n_bpe and all(
            bytes(to_byte[ch] for ch in text) == tokenizer.token_bytes(i) for text, i in vocab.items()
        )
        same_added = {a["content"]: a["id"] for a in added} == tokenizer.special_tokens
    except (ValueError, KeyError, TypeError, QwenkitError):
        return None
    return hf if same_vocab and same_added and hf["model"].get("merges") else None


def _eos_id(tokenizer: Tokenizer, model: Qwen) -> int:
    """The id that ends a reply: the tokenizer's own eos when it names one, else <|im_end|> for chat
    models and <|endoftext|> for base ones (what qwenkit's tokenizer_config.json says)."""
    name = getattr(tokenizer, "eos_token", None)
    if name and getattr(tokenizer, "kind", None) == "tokenizer.json":
        return tokenizer.special_tokens[name]
    chat = model.generation_config is None or model.generation_config.chat_format == "chatml"
    return tokenizer.im_end_id if chat else tokenizer.eod_id


def gguf_tensors(model: Qwen) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight, named by gguf's own Qwen2 table (`blk.N.attn_q.weight`,
    ...); no `output.weight` when the head is tied to the embedding (llama.cpp reuses token_embd)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, model.config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise QwenkitError(f"no GGUF name for the tensor {name}")
        yield new_name, tensor


def ggml_type(
    name: str, tensor: torch.Tensor, matrix_type: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """f32 for vectors and norms; the chosen type for matrices, f16 where a q8_0 row does not divide
    into 32-value blocks (llama.cpp's converter falls back the same way)."""
    if tensor.dim() <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if matrix_type == gguf.GGMLQuantizationType.Q8_0:
        block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
        if tensor.shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
    return matrix_type


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in `qtype` (q8_0 through gguf's own quantizer, as llama.cpp's converter)."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if qtype in NUMPY_TYPES:
        return data.astype(NUMPY_TYPES[qtype])
    return gguf.quants.quantize(data, qtype)


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="param", unit_scale=True, desc="writing GGUF", disable=not show)
