"""Hugging Face checkpoint directories: read the original Qwen and the Qwen2 layouts, write Qwen2.

Reading is lazy (safetensors memory maps, one tensor at a time onto a model built on the meta
device), so peak memory stays near the size of the model itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenkit.config import QwenConfig
from qwenkit.devices import pick_device
from qwenkit.errors import QwenkitError
from qwenkit.model import Qwen, cpu_decode_layout
from qwenkit.quant.formats import QuantConfig, read_quant_config, unpack_layer
from qwenkit.quant.linear import QuantLinear
from qwenkit.quant.weights import QuantizedWeight
from qwenkit.tokenizer import Tokenizer

ORIGINAL, QWEN2 = "qwen", "qwen2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QWENKIT_KEYS = (
    "use_dynamic_ntk", "use_logn_attn", "use_window_attn", "window_sizes", "use_cache_quantization"
)  # fmt: skip
KV_CACHE_KINDS = ("float", "int8")
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some exporters save; recomputed here
QUANTIZED_PART = re.compile(r"(.+)\.(qweight|qzeros|scales|g_idx)")  # GPTQ/AWQ: a layer's packed tensors


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise QwenkitError(f"unsupported dtype {dtype}; choose one of: {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise QwenkitError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config_json(path: str | os.PathLike) -> dict:
    directory = Path(path)
    if not directory.exists():
        raise QwenkitError(f"checkpoint not found: {directory}")
    if not directory.is_dir():
        raise QwenkitError(f"a checkpoint is a directory with config.json, got a file: {directory}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise QwenkitError(f"no config.json in {directory}: not a Hugging Face checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenkitError(f"{config_file} is not valid JSON: {e}") from None


def detect_layout(hf: dict) -> str:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type == "qwen" or "QWenLMHeadModel" in architectures or "kv_channels" in hf:
        return ORIGINAL
    if model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        return QWEN2
    raise QwenkitError(
        f"unknown checkpoint layout (model_type={model_type!r}, architectures={architectures}); "
        "qwenkit reads the original Qwen layout and the Qwen2 family (Qwen1.5/2/2.5)"
    )


def config_from_hf(hf: dict) -> tuple[QwenConfig, str]:
    """QwenConfig and layout name from a checkpoint's config.json contents."""
    layout = detect_layout(hf)
    try:
        if layout == ORIGINAL:
            if float(hf.get("rotary_pct", 1.0)) != 1.0:
                raise QwenkitError(f"rotary_pct {hf['rotary_pct']} is not supported (Qwen uses 1.0)")
            config = QwenConfig(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"] // 2,  # the original stores twice the FFN width
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                head_dim=hf.get("kv_channels"),
                max_position_embeddings=hf.get("seq_length", 2048),
                rope_theta=float(hf.get("rotary_emb_base", 10000.0)),
                rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                initializer_range=hf.get("initializer_range", 0.02),
                use_dynamic_ntk=bool(hf.get("use_dynamic_ntk", False)),
                use_logn_attn=bool(hf.get("use_logn_attn", False)),
                use_cache_quantization=bool(hf.get("use_cache_quantization", False)),
            )
        else:
            scaling = hf.get("rope_scaling") or {}
            rope_parameters = hf.get("rope_parameters") or {}
            rope_type = scaling.get("rope_type", scaling.get("type")) or rope_parameters.get("rope_type")
            if rope_type not in (None, "default"):
                raise QwenkitError(f"rope scaling {rope_type!r} is not supported; qwenkit uses dynamic NTK")
            if hf.get("use_sliding_window"):
                raise QwenkitError(
                    "Qwen2 sliding-window attention is not supported; qwenkit has window_sizes"
                )
            extras = hf.get("qwenkit") or {}
            config = QwenConfig(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                rope_theta=float(hf.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                initializer_range=hf.get("initializer_range", 0.02),
                **{k: extras[k] for k in QWENKIT_KEYS if k in extras},
            )
    except KeyError as e:
        raise QwenkitError(f"config.json lacks the key {e.args[0]!r}") from None
    except TypeError as e:
        raise QwenkitError(f"config.json has a value of the wrong type: {e}") from None
    return config, layout


def config_to_hf(config: QwenConfig, dtype: torch.dtype, tokenizer: Tokenizer | None = None) -> dict:
    """config.json contents in the Qwen2 layout, plus qwenkit's own switches (ignored by others).

    bos/eos are the tokenizer's <|endoftext|> (as in Qwen2's own config.json); without a tokenizer
    they are left out rather than guessed (an id outside the vocabulary makes transformers warn).
    """
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers_version(),
        "qwenkit": {k: getattr(config, k) for k in QWENKIT_KEYS},
    }
    if tokenizer is not None:
        hf["bos_token_id"] = hf["eos_token_id"] = tokenizer.eod_id
    return hf


def transformers_version() -> str:
    """The installed transformers' version (without importing it), else a recent one: transformers
    reads the key to decide how to treat older files (4.57 warns of a wrong regex without it)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "4.57.1"


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, from an index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise QwenkitError(f"{index} is not a valid weight index: {e}") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise QwenkitError(f"{index} names missing shard files: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise QwenkitError(f"no weights in {directory} (expected model.safetensors or an index with shards)")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def safetensors_header(file: Path) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data) of a .safetensors file, checked
    against the file: every tensor's byte range fits its shape, and the data after the header is
    exactly as long as the largest end offset (so a truncated download is caught here)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise QwenkitError(f"{file} is not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
            data_size = os.fstat(f.fileno()).st_size - 8 - size
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenkitError(f"{file} has a corrupt safetensors header: {e}") from None
    except OSError as e:
        raise QwenkitError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise QwenkitError(f"{file} has a corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in SAFETENSORS_DTYPES:
            raise QwenkitError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        valid = (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        )
        itemsize = SAFETENSORS_DTYPES[dtype].itemsize
        if not valid or offsets[1] - offsets[0] != _numel(tuple(shape)) * itemsize:
            raise QwenkitError(
                f"{file} has a corrupt safetensors header: tensor {name}'s shape and offsets disagree"
            )
        end = max(end, offsets[1])
    if data_size != end:
        state = "truncated" if data_size < end else "longer than its header says"
        raise QwenkitError(
            f"{file} is {state}: its header describes {end:,} bytes of tensor data, the file holds {data_size:,}"
        )
    return header, 8 + size


def read_pickled_weights(file: Path, device: str) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors (memory-mapped; `device` "meta" reads shapes only)."""
    try:
        return torch.load(file, map_location=device, mmap=True, weights_only=True)
    except Exception as e:  # a truncated or corrupt file raises many error types
        raise QwenkitError(f"cannot read {file}: {' '.join(str(e).split())[:200]}") from None


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one at a time.

    safetensors files are read with plain reads into private memory rather than through the
    safetensors package's shared memory map: when the loader then converts a tensor (dtype, CPU
    layout) the original is freed at once, so peak memory stays at the model plus one tensor.
    """
    for file in files:
        if file.suffix != ".safetensors":
            yield from read_pickled_weights(file, "cpu").items()
            continue
        header, data_start = safetensors_header(file)
        with open(file, "rb") as f:
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                buffer = bytearray(end - begin)
                f.seek(data_start + begin)
                if f.readinto(buffer) != len(buffer):
                    raise QwenkitError(f"{file} is truncated: tensor {name} is incomplete")
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(entry["shape"])


def tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes (torch's names) of every tensor, from file headers only for safetensors."""
    shapes = {}
    for file in files:
        if file.suffix == ".safetensors":
            header, _ = safetensors_header(file)
            for name, entry in header.items():
                dtype = str(SAFETENSORS_DTYPES[entry["dtype"]]).removeprefix("torch.")
                shapes[name] = (tuple(entry["shape"]), dtype)
            continue
        for name, tensor in read_pickled_weights(file, "meta").items():
            shapes[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return shapes


_ORIGINAL_BLOCK = {
    "ln_1.weight": ["input_layernorm.weight"],
    "ln_2.weight": ["post_attention_layernorm.weight"],
    "attn.c_attn.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.c_attn.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attn.c_proj.weight": ["self_attn.o_proj.weight"],
    "mlp.w1.weight": ["mlp.up_proj.weight"],  # w1 is "up"
    "mlp.w2.weight": ["mlp.gate_proj.weight"],  # SiLU is applied to w2: the gate
    "mlp.c_proj.weight": ["mlp.down_proj.weight"],
}
_ORIGINAL_TOP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def original_names(name: str) -> list[str]:
    """The Qwen2-layout name(s) of one original-layout tensor name (three for the fused c_attn)."""
    if name in _ORIGINAL_TOP:
        return [_ORIGINAL_TOP[name]]
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if match and match.group(2) in _ORIGINAL_BLOCK:
        return [f"model.layers.{match.group(1)}.{t}" for t in _ORIGINAL_BLOCK[match.group(2)]]
    return [name]  # unknown: reported as unexpected by the caller


def original_to_qwen2(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Rename (and for the fused c_attn, split into Q, K, V) one tensor of the original layout."""
    targets = original_names(name)
    if len(targets) == 1:
        return [(targets[0], tensor)]
    if tensor.shape[0] % 3:
        raise QwenkitError(f"{name} has shape {tuple(tensor.shape)}; the fused QKV needs a multiple of 3")
    return list(zip(targets, tensor.chunk(3, dim=0), strict=True))


def load_weights(
    model: Qwen,
    directory: Path,
    layout: str,
    dtype: torch.dtype,
    device,
    quant: QuantConfig | None = None,
    half: torch.dtype | None = None,
) -> None:
    """Fill a model built on the meta device from the checkpoint, checking every name and shape.

    `half` (float16/bfloat16): the blocks' linear weights are read straight into that dtype (never a
    whole fp32 copy of the model), for load(weights=...) to make HalfLinear layers of.

    With `quant` (a GPTQ/AWQ checkpoint), each linear layer stored as qweight/qzeros/scales[/g_idx]
    becomes a QuantLinear holding the packed weight; the fused c_attn of the original layout is
    split along its outputs into q/k/v (exact: scales and zeros are per output row).
    """
    expected = {name: p for name, p in model.named_parameters()}  # tied head appears once, as embed
    tied = model.config.tie_word_embeddings
    loaded: dict[str, torch.Tensor] = {}
    stored_parts: dict[str, dict[str, torch.Tensor]] = {}  # quantized layer -> its packed tensors
    unexpected, misshaped = [], []
    for name, tensor in iter_tensors(weight_files(directory)):
        if IGNORED_TENSORS.fullmatch(name):
            continue
        part = QUANTIZED_PART.fullmatch(name) if quant is not None else None
        if part:
            stored_parts.setdefault(part.group(1), {})[part.group(2)] = tensor
            continue
        pieces = original_to_qwen2(name, tensor) if layout == ORIGINAL else [(name, tensor)]
        for target, piece in pieces:
            if tied and target == "lm_head.weight":
                continue
            if target not in expected:
                unexpected.append(name)
            elif tuple(piece.shape) != tuple(expected[target].shape):
                misshaped.append(f"{name} {tuple(piece.shape)} != {tuple(expected[target].shape)}")
            elif half is not None and target.endswith("proj.weight"):
                loaded[target] = piece.to(device=device, dtype=half)
            else:
                piece = piece.to(device=device, dtype=dtype)
                is_linear = (
                    target.endswith("proj.weight") or target == "lm_head.weight" or tied and "embed" in target
                )
                loaded[target] = cpu_decode_layout(piece) if device.type == "cpu" and is_linear else piece
    quantized: dict[str, QuantizedWeight] = {}  # module name -> weight
    for prefix, parts in stored_parts.items():
        weight_name = f"{prefix}.weight"
        targets = original_names(weight_name) if layout == ORIGINAL else [weight_name]
        if tied and targets == ["lm_head.weight"]:
            continue
        if any(t not in expected for t in targets):
            unexpected.append(f"{prefix}.qweight")
            continue
        whole = unpack_layer(quant, parts, prefix).to(device)
        pieces = whole.split_outputs([expected[t].shape[0] for t in targets]) if len(targets) > 1 else [whole]
        for target, piece in zip(targets, pieces, strict=True):
            shape = (piece.out_features, piece.in_features)
            if shape != tuple(expected[target].shape):
                misshaped.append(f"{prefix}.qweight {shape} != {tuple(expected[target].shape)}")
            else:
                quantized[target.removesuffix(".weight")] = piece
    missing = [
        name for name in expected if name not in loaded and name.removesuffix(".weight") not in quantized
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            problems.append(f"{label} tensors: {shown}")
    if problems:
        raise QwenkitError(f"checkpoint {directory} does not match its config: " + "; ".join(problems))
    model.load_state_dict(loaded, strict=False, assign=True)
    for module_name, weight in quantized.items():
        parent_name, _, child = module_name.rpartition(".")
        bias = model.get_submodule(module_name).bias
        setattr(model.get_submodule(parent_name), child, QuantLinear.from_weight(weight, bias))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def load(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    adapter: str | os.PathLike | None = None,
    kv_cache: str | None = None,
    head: str | None = None,
    weights: str | None = None,
) -> tuple[Qwen, Tokenizer]:
    """Load a checkpoint directory (original Qwen or Qwen2 layout) -> (model in eval mode, tokenizer).

    With no path, the embedded demo model. device: cpu, cuda, cuda:N or "auto" (cuda when available).
    dtype: float32, bfloat16 or float16; "auto" (or None) is float32 on CPU and the checkpoint's own
    dtype on GPUs. `adapter`: a LoRA adapter directory (peft format) merged into the weights.
    kv_cache: "float" or "int8" (config.use_cache_quantization); None keeps the checkpoint's setting.
    head: "fp16", "bf16" or "int8" holds the LM head in fewer bytes for faster decoding
    (qwenkit.quant.linear.convert_head); None keeps it as stored.
    weights: "fp16" or "bf16" stores the blocks' float matrices (and the head, unless `head` says
    otherwise) in 16 bits while activations, norms and embeddings stay fp32
    (qwenkit.quant.linear.use_half_weights): half the bytes per decoded token, widened to fp32 inside
    qwenkit's CPU kernels, so faster than fp32 where the CPU has no 16-bit arithmetic. The blocks'
    matrices are read straight into 16 bits (no fp32 copy of the model; with an adapter, after the
    merge). Needs dtype float32.
    """
    if kv_cache is not None and kv_cache not in KV_CACHE_KINDS:
        raise QwenkitError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kv_cache!r}")
    if path is None:
        from qwenkit import default_model_path

        path = default_model_path()
    directory = Path(path)
    hf = read_config_json(directory)
    config, layout = config_from_hf(hf)
    if kv_cache is not None:
        config.use_cache_quantization = kv_cache == "int8"
    device = pick_device(device)
    stored = hf.get("torch_dtype") or hf.get("dtype")
    default = DTYPES.get(stored, torch.bfloat16) if device.type != "cpu" else torch.float32
    dtype = resolve_dtype(dtype, default)
    half = None
    if weights is not None:
        from qwenkit.quant.linear import HALF_WEIGHTS

        if weights not in HALF_WEIGHTS:
            raise QwenkitError(f"weights must be one of {', '.join(HALF_WEIGHTS)}, got {weights!r}")
        if dtype != torch.float32:
            raise QwenkitError(
                f"16-bit weights ({weights}) keep fp32 activations: use them with dtype float32, not {dtype}"
            )
        half = HALF_WEIGHTS[weights]
    tokenizer = Tokenizer.from_file(directory)
    with torch.device("meta"):
        model = Qwen(config)
    quant = read_quant_config(directory, hf)
    early = half if adapter is None else None  # an adapter is merged into fp32 weights first
    load_weights(model, directory, layout, dtype, device, quant, early)
    from qwenkit.generation import GenerationConfig

    model.generation_config = GenerationConfig.from_checkpoint(directory)
    model.generation_config.vocab_size = tokenizer.vocab_size  # never sample embedding padding rows
    if adapter is not None:
        from qwenkit.lora import merge_adapter

        model = merge_adapter(model, adapter)
    if half is not None:
        from qwenkit.quant.linear import use_half_weights

        use_half_weights(model, half, head=head is None)
    if head is not None:
        from qwenkit.quant.linear import convert_head

        convert_head(model, head)
    return model.eval(), tokenizer


def save(
    model: Qwen,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write a Qwen2-layout directory transformers and vLLM load; written to a temporary directory
    beside the target and renamed at the end, so a crash never leaves a half-written checkpoint."""
    dtype = resolve_dtype(dtype, model.dtype)
    return save_state_dict(
        model.state_dict(), model.config, model.generation_config, tokenizer, path, dtype, max_shard_bytes
    )


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    config: QwenConfig,
    generation_config,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike,
    dtype: torch.dtype,
    max_shard_bytes: int = 4 * 1024**3,
    hf_config: dict | None = None,
) -> Path:
    """`save` for a state dict (what distributed training gathers) rather than a model object.
    `hf_config`: config.json keys to set besides the Qwen2 ones (a reward model's architecture)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {
            name: tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            for name, tensor in state_dict.items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")
        }
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], staging / "model.safetensors", metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, staging / file, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = {**config_to_hf(config, dtype, tokenizer), **(hf_config or {})}
        (staging / "config.json").write_text(json.dumps(hf, indent=2))
        from qwenkit.generation import QWENKIT_GENERATION_FILE, GenerationConfig, context_length
        from qwenkit.hf_tokenizer import write_hf_tokenizer

        settings = generation_config or GenerationConfig()
        generation = settings.to_hf()
        if tokenizer is not None:
            if tokenizer.kind == "qwen.tiktoken":  # a tokenizer.json one keeps its added tokens there only
                tokenizer.save(staging / "qwen.tiktoken")
            # Hugging Face tokenizer files too, so transformers' AutoTokenizer and vLLM load the directory;
            # chat models end turns at <|im_end|>, which other libraries only know through eos_token_id.
            chat = settings.chat_format == "chatml"
            generation["bos_token_id"] = tokenizer.eod_id  # as Qwen2's own generation_config.json
            generation["eos_token_id"] = [tokenizer.eod_id, tokenizer.im_end_id] if chat else tokenizer.eod_id
            generation["pad_token_id"] = tokenizer.pad_id  # the tokenizer's own ids, whatever its vocabulary
            eos = "<|im_end|>" if chat else "<|endoftext|>"
            eos = None if tokenizer.kind == "tokenizer.json" else eos  # None: the tokenizer's own
            write_hf_tokenizer(tokenizer, staging, eos_token=eos, model_max_length=context_length(config))
        else:  # keep only ids this model has (qwenkit's defaults are the official vocabulary's)
            generation = {k: v for k, v in generation.items() if _ids_within(v, config.vocab_size)}
        generation["transformers_version"] = transformers_version()
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (staging / QWENKIT_GENERATION_FILE).write_text(json.dumps(settings.to_qwenkit(), indent=2))
        _make_readable(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _ids_within(value, vocab_size: int) -> bool:
    """False for a token id setting (an int or list of ints) naming an id outside [0, vocab_size)."""
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return True  # not a token id setting
    return all(0 <= i < vocab_size for i in ids)


def _make_readable(directory: Path) -> None:
    """Modes as transformers leaves them: 0o777 and 0o666 less the umask (the staging directory from
    tempfile is 0o700 and safetensors' files may be 0o600), so other users and services can read."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def describe(path: str | os.PathLike) -> dict:
    """What `qwenkit info` prints: layout, shapes, parameters, dtype, memory, tokenizer; reads no weights."""
    directory = Path(path)
    hf = read_config_json(directory)
    config, layout = config_from_hf(hf)
    shapes = tensor_shapes(weight_files(directory))
    stored = sum(_numel(shape) for shape, _ in shapes.values())
    dtypes = sorted({dtype for _, dtype in shapes.values()})
    params = config.num_parameters
    quant = read_quant_config(directory, hf)
    packed = {name: entry for name, entry in shapes.items() if quant and QUANTIZED_PART.fullmatch(name)}
    packed_bytes = sum(_numel(shape) * getattr(torch, dtype).itemsize for shape, dtype in packed.values())
    quantized_weights = sum(  # each int32 of a qweight holds 32 / bits weights
        _numel(shapes[name][0]) * 32 // quant.bits for name in packed if name.endswith(".qweight")
    )
    float_params = params - quantized_weights
    info = {
        "path": str(directory),
        "layout": "original Qwen (QWenLMHeadModel)" if layout == ORIGINAL else "Qwen2 (Qwen2ForCausalLM)",
        "config": config.to_dict(),
        "parameters": params,
        "stored_tensors": len(shapes),
        "stored_parameters": stored,
        "stored_dtypes": dtypes,
        "memory_gib": {  # packed layers as stored, the rest in each float dtype
            name: round((float_params * d.itemsize + packed_bytes) / 1024**3, 3) for name, d in DTYPES.items()
        },
        "tokenizer": describe_tokenizer(directory),
    }
    if quant is not None:
        info["quantization"] = {
            **quant.to_dict(),
            "quantized_layers": sum(name.endswith(".qweight") for name in packed),
            "packed_bytes": packed_bytes,
        }
    return info


def describe_tokenizer(directory: Path) -> dict:
    """The checkpoint's tokenizer for `qwenkit info`: kind, sizes, eos/bos/pad, whether it has a chat
    template, every added token (name -> id) and the control ones; {"error": ...} when it cannot load."""
    try:
        tokenizer = Tokenizer.from_file(directory)
    except QwenkitError as e:
        return {"error": str(e)}
    added = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    return {
        "kind": tokenizer.kind,
        "file": str(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "bpe_tokens": tokenizer.n_bpe,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": tokenizer.chat_template is not None,
        "added_tokens": dict(added),
        "control_tokens": [name for name, _ in added if name in tokenizer.control_tokens],
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
