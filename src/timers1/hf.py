"""The released Hugging Face checkpoint format, both ways, and our own model directory format.

Released layout (``bytedance-research/Timer-S1``): ``config.json`` + ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``. Its key names
(``model.layers.0.ffn_layer.experts.3.up_proj.weight``, ``mtp_modules.5.projection_matrix.weight``)
map one-to-one onto ours, except that the E per-expert matrices of a block are stacked into one
``[E, F, D]`` parameter here (that is what the grouped GEMM consumes).

Our model directory: ``config.yaml`` (a full run config; the model and moe sections describe
the architecture) + ``model.safetensors`` with our parameter names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from timers1.config import Config, ModelConfig, MoEConfig, config_from_dict, read_yaml, save_config
from timers1.errors import InputError

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
OUR_CONFIG = "config.yaml"
OUR_WEIGHTS = "model.safetensors"
HF_MAX_POSITION_EMBEDDINGS = 12800  # the released checkpoints' value

# Keys inside one TimeMoE block (released name -> ours). Experts are handled separately.
_BLOCK_KEYS = {
    "norm1.weight": "attention_norm.weight",
    "norm2.weight": "moe_norm.weight",
    "ffn_layer.gate.weight": "moe.router.weight",
    "self_attn.q_scale": "attention.q_norm.weight",
    "self_attn.k_scale": "attention.k_norm.weight",
    "self_attn.o_proj.weight": "attention.o_proj.weight",
    **{f"self_attn.{p}_proj.{w}": f"attention.{p}_proj.{w}" for p in ("q", "k", "v", "gate") for w in ("weight", "bias")},
}
_EXPERT_KEY = re.compile(r"ffn_layer\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_EXPERT_PARAM = {"gate": "w_gate_EFD", "up": "w_up_EFD", "down": "w_down_EDF"}
_RESIDUAL_MLP = [f"{layer}.{w}" for layer in ("hidden_layer", "output_layer", "residual_layer") for w in ("weight", "bias")]
_STP_KEYS = {
    "norm_hidden.weight": "hidden_norm.weight",
    "norm_embeds.weight": "embed_norm.weight",
    "projection_matrix.weight": "projection.weight",
    "norm.weight": "out_norm.weight",
}


class CheckpointFormatError(InputError):
    """A checkpoint directory is missing files, or its keys do not match the architecture."""


# --------------------------------------------------------------------------------------------
# config.json <-> our config

def model_config_from_hf(hf: dict, source: str = HF_CONFIG) -> tuple[ModelConfig, MoEConfig]:
    def get(name, default=None):
        if name in hf:
            return hf[name]
        if default is None:
            raise CheckpointFormatError(f"{source}: missing field {name!r}")
        return default

    patch = int(get("input_token_len"))
    out_lens = list(get("output_token_lens", [patch]))
    if out_lens[-1] != patch:
        raise CheckpointFormatError(
            f"{source}: output_token_lens={out_lens} differs from input_token_len={patch}; "
            "dense next-patch training needs equal input and output patch lengths"
        )
    if get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    model = ModelConfig(
        patch_points=patch,
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_stp_blocks=int(hf.get("num_mtp_tokens") or 0),
        num_heads=int(get("num_attention_heads")),
        intermediate_size=int(get("intermediate_size")),
        quantiles=[float(q) for q in get("quantiles")],
        rope_theta=float(get("rope_theta", 10000.0)),
        dropout=float(get("dropout_rate", 0.1)),
        init_std=float(get("initializer_range", 0.02)),
    )
    moe = MoEConfig(num_experts=int(get("num_experts")), top_k=int(get("num_experts_per_token")))
    return model, moe


def model_config_to_hf(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["TimerS1ForPrediction"],
        "model_type": "Timer-S1",
        "input_token_len": model.patch_points,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "output_token_lens": [model.patch_points],
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "hidden_act": "silu",
        "use_cache": True,
        "rope_theta": model.rope_theta,
        "dropout_rate": model.dropout,
        "initializer_range": model.init_std,
        # The released code sizes its RoPE cache from this (and extends it for longer inputs);
        # our model computes the tables per call, so only the file format keeps the field.
        "max_position_embeddings": HF_MAX_POSITION_EMBEDDINGS,
        "quantiles": list(model.quantiles),
        "num_experts": moe.num_experts,
        "num_experts_per_token": moe.top_k,
        "num_mtp_tokens": model.num_stp_blocks,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------------------
# state-dict key mapping

def _block_hf_to_ours(key: str) -> str | tuple[str, int, str] | None:
    """Block-relative released key -> our key, or (stacked param, expert, None) for experts."""
    if key in _BLOCK_KEYS:
        return _BLOCK_KEYS[key]
    match = _EXPERT_KEY.match(key)
    if match:
        return (f"moe.experts.{_EXPERT_PARAM[match.group(2)]}", int(match.group(1)), "")
    return None


def hf_key_to_ours(key: str) -> str | tuple[str, int, str] | None:
    """Map one released key; experts map to (our stacked key, expert index, '')."""
    for prefix, ours in (("model.embed_layer.", "embed."), ("output_patch_embedding.", "head.")):
        if key.startswith(prefix) and key[len(prefix):] in _RESIDUAL_MLP:
            return ours + key[len(prefix):]
    if key == "model.norm.weight":
        return "norm.weight"
    match = re.match(r"model\.layers\.(\d+)\.(.+)$", key)
    if match:
        inner = _block_hf_to_ours(match.group(2))
        prefix = f"layers.{match.group(1)}."
    else:
        match = re.match(r"mtp_modules\.(\d+)\.(.+)$", key)
        if not match:
            return None
        prefix = f"stp_blocks.{match.group(1)}."
        rest = match.group(2)
        if rest in _STP_KEYS:
            return prefix + _STP_KEYS[rest]
        if not rest.startswith("layer."):
            return None
        inner = _block_hf_to_ours(rest[len("layer."):])
        prefix += "block."
    if inner is None:
        return None
    if isinstance(inner, tuple):
        return (prefix + inner[0], inner[1], "")
    return prefix + inner


def _expected_keys(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, torch.Size]:
    from timers1.model import build_model

    model = build_model(model_cfg, moe_cfg, device="meta")
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_keys(have: set[str], expected: set[str], source: str) -> None:
    missing, unexpected = sorted(expected - have), sorted(have - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unknown keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointFormatError(f"{source}: " + "; ".join(parts))


def hf_state_to_ours(hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig,
                     source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Released state dict -> ours (experts stacked). Unknown or missing keys raise, listing them."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, tensor in hf_state.items():
        mapped = hf_key_to_ours(key)
        if mapped is None:
            unknown.append(key)
        elif isinstance(mapped, tuple):
            experts.setdefault(mapped[0], {})[mapped[1]] = tensor
        else:
            ours[mapped] = tensor
    if unknown:
        raise CheckpointFormatError(f"{source}: unknown keys ({len(unknown)}): {', '.join(sorted(unknown)[:20])}")
    expected = _expected_keys(model_cfg, moe_cfg)
    for name, by_index in experts.items():
        num = expected[name][0] if name in expected else moe_cfg.num_experts
        absent = [e for e in range(num) if e not in by_index]
        if absent or max(by_index) >= num:
            hf_name = name.replace("layers.", "model.layers.", 1) if name.startswith("layers.") else name
            raise CheckpointFormatError(
                f"{source}: experts of {hf_name} are incomplete: have {sorted(by_index)}, need 0..{num - 1}"
            )
        ours[name] = torch.stack([by_index[e] for e in range(num)])
    _check_keys(set(ours), set(expected), source)
    for key, shape in expected.items():
        if ours[key].shape != shape:
            raise CheckpointFormatError(f"{source}: {key} has shape {tuple(ours[key].shape)}, expected {tuple(shape)}")
    return ours


def our_key_to_hf(key: str) -> list[str]:
    """Our key -> released key(s); a stacked expert parameter maps to one key per expert (in order)."""
    for ours, hf in (("embed.", "model.embed_layer."), ("head.", "output_patch_embedding.")):
        if key.startswith(ours):
            return [hf + key[len(ours):]]
    if key == "norm.weight":
        return ["model.norm.weight"]
    inverse_block = {v: k for k, v in _BLOCK_KEYS.items()}
    inverse_stp = {v: k for k, v in _STP_KEYS.items()}

    def block(prefix: str, rest: str) -> list[str]:
        if rest in inverse_block:
            return [prefix + inverse_block[rest]]
        for short, param in _EXPERT_PARAM.items():
            if rest == f"moe.experts.{param}":
                return [prefix + f"ffn_layer.experts.{{e}}.{short}_proj.weight"]
        raise KeyError(key)

    match = re.match(r"layers\.(\d+)\.(.+)$", key)
    if match:
        return block(f"model.layers.{match.group(1)}.", match.group(2))
    match = re.match(r"stp_blocks\.(\d+)\.(.+)$", key)
    if match:
        prefix, rest = f"mtp_modules.{match.group(1)}.", match.group(2)
        if rest in inverse_stp:
            return [prefix + inverse_stp[rest]]
        if rest.startswith("block."):
            return block(prefix + "layer.", rest[len("block."):])
    raise KeyError(key)


def ours_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        try:
            (hf_key,) = our_key_to_hf(key)
        except KeyError:
            raise CheckpointFormatError(f"no released name for parameter {key!r}") from None
        if "{e}" in hf_key:
            for e in range(tensor.shape[0]):
                out[hf_key.format(e=e)] = tensor[e].contiguous()
        else:
            out[hf_key] = tensor.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# reading and writing directories

def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointFormatError(f"{file}: weight file listed but missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except CheckpointFormatError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CheckpointFormatError(f"{file}: not a readable safetensors file ({exc})") from None
    return state


def is_hf_dir(path: Path) -> bool:
    return (path / HF_CONFIG).is_file()


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, MoEConfig, dict[str, torch.Tensor]]:
    """Read a released-layout directory into (model cfg, moe cfg, our state dict)."""
    path = Path(path)
    config_file = path / HF_CONFIG
    if not config_file.is_file():
        raise CheckpointFormatError(f"{path}: no {HF_CONFIG}; not a Hugging Face checkpoint directory")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{config_file}: not valid JSON ({exc})") from None
    model_cfg, moe_cfg = model_config_from_hf(hf_config, str(config_file))
    if (path / HF_INDEX).is_file():
        try:
            weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointFormatError(f"{path / HF_INDEX}: not a safetensors index ({exc})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / HF_SINGLE).is_file():
        files = [path / HF_SINGLE]
    else:
        raise CheckpointFormatError(f"{path}: neither {HF_SINGLE} nor {HF_INDEX} found")
    return model_cfg, moe_cfg, hf_state_to_ours(_read_safetensors(files), model_cfg, moe_cfg, str(path))


def write_hf_dir(path: str | Path, model_cfg: ModelConfig, moe_cfg: MoEConfig, state: dict[str, torch.Tensor],
                 max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the released layout; shards (with an index) when the weights exceed ``max_shard_bytes``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_state = ours_state_to_hf(state)
    dtype = next(iter(hf_state.values())).dtype
    (path / HF_CONFIG).write_text(json.dumps(model_config_to_hf(model_cfg, moe_cfg, dtype), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / HF_SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    (path / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_model_dir(path: str | Path, cfg: Config, state: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / OUR_CONFIG)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / OUR_WEIGHTS), metadata={"format": "pt"})


def read_config_file(path: Path) -> Config:
    return config_from_dict(read_yaml(path, "run config", CheckpointFormatError) or {})


def read_model_dir(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    path = Path(path)
    for name in (OUR_CONFIG, OUR_WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointFormatError(f"{path}: no {name}; not a timers1 model directory")
    cfg = read_config_file(path / OUR_CONFIG)
    state = _read_safetensors([path / OUR_WEIGHTS])
    expected = _expected_keys(cfg.model, cfg.moe)
    _check_keys(set(state), set(expected), str(path / OUR_WEIGHTS))
    return cfg, state
