"""Timer-S1: patch embedding, L TimeMoE blocks, H TimeSTP blocks and one shared quantile head.

Two entry points share every module:
  * ``forward`` (training): dense predictions at every position from the main stack
    (patch i+1) and from each STP block j (patch i+j+1), plus the router records;
  * ``forecast_pass`` (inference): one pass that predicts up to (H+1)*P future points from the
    last position, skipping the STP blocks the horizon does not need.

The model sees already-normalized values (see ``instance_normalize``); it knows nothing of
process groups. Parallelism is applied from outside by ``timers1.parallel``. A pipeline stage is
this same module with the units it does not own removed (``embed``/``norm`` set to ``None``,
blocks deleted from the ModuleDicts, as torchtitan does): ``forward`` runs whatever is left, so
the stage and the whole model share one forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from timers1.config import ModelConfig, MoEConfig
from timers1.model.attention import HeadRMSNorm
from timers1.model.block import TimeMoEBlock, TimeSTPBlock
from timers1.model.layers import ResidualMLP, RMSNorm, rope_cos_sin
from timers1.model.moe import RouterRecord

# generate() in the released code divides by (std + 1e-5); training uses the same scale so a
# model sees identically normalized inputs in both.
NORM_EPS = 1e-5


def instance_normalize(values_BL: torch.Tensor, mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-series mean and population std over observed points; padding stays exactly 0.

    Returns (normalized values, mean_B1, scale_B1) with scale = std + 1e-5.
    """
    mask = mask_BL.to(values_BL.dtype)
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = (values_BL * mask).sum(dim=-1, keepdim=True) / count
    var = (((values_BL - mean) * mask) ** 2).sum(dim=-1, keepdim=True) / count
    scale = var.sqrt() + NORM_EPS
    return ((values_BL - mean) / scale) * mask, mean, scale


def observed_patches(mask_BL: torch.Tensor, patch_points: int) -> torch.Tensor:
    """bool [B, N]: patches holding at least one observed point."""
    batch, length = mask_BL.shape
    return mask_BL.view(batch, length // patch_points, patch_points).amax(dim=-1) > 0


def padding_masks(mask_BL: torch.Tensor, patch_points: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention mask [B, 1, N, N], token validity [B, N]) for a padded batch; (None, None) without padding.

    The attention mask is causal and hides fully padded patches as keys (each token still sees itself).

    Training windows of short series are left-padded with whole patches of nothing; inference
    pads less than one patch, so it never has such tokens (``None`` here, plain causal
    attention, identical to the released code). Hiding them matters for training: they
    embed to exactly zero while the embedding biases are zero, RMSNorm then scales their
    gradient by 1/eps per block, and anything that reaches them overflows to inf. With the
    mask (and the loss skipping their positions) no gradient reaches them at all.
    """
    valid_BN = observed_patches(mask_BL, patch_points)
    if bool(valid_BN.all()):
        return None, None
    num = valid_BN.shape[1]
    causal_NN = torch.ones(num, num, dtype=torch.bool, device=mask_BL.device).tril()
    eye_NN = torch.eye(num, dtype=torch.bool, device=mask_BL.device)
    return (causal_NN & (valid_BN[:, None, :] | eye_NN)).unsqueeze(1), valid_BN


@dataclass
class TimerS1Output:
    """Training forward output of the units a module holds (normalized units)."""

    h_BND: torch.Tensor
    """Hidden state after the last unit (what the next pipeline stage continues from)."""
    h0_BND: torch.Tensor | None
    """Patch embeddings, which every STP block consumes (None without STP blocks)."""
    horizons: list[int] = field(default_factory=list)
    """Horizon of each prediction: 0 for the main stack's next patch, j for STP block j."""
    predictions: list[torch.Tensor] = field(default_factory=list)
    """Quantiles [B, N, Q, P] per horizon in ``horizons``."""
    router_records: list[RouterRecord] = field(default_factory=list)
    """One per MoE block run, main blocks first then STP blocks."""
    block_ids: list[int] = field(default_factory=list)
    """Global index (0..L+H-1) of the block behind each router record."""

    @property
    def quantiles_BJNQP(self) -> torch.Tensor:
        """All predictions stacked: J horizons in the order they were made."""
        return torch.stack(self.predictions, dim=1)


class TimerS1(nn.Module):
    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        p, d = model_cfg.patch_points, model_cfg.hidden_size
        self.num_quantiles = len(model_cfg.quantiles)
        # Each patch token is concat(values[P], mask[P]).
        self.embed = ResidualMLP(2 * p, model_cfg.intermediate_size, d, model_cfg.dropout)
        # ModuleDict keyed by the block index (as torchtitan does) so that a pipeline stage can
        # drop the blocks it does not own and keep the fully qualified names of the rest.
        self.layers = nn.ModuleDict({str(i): TimeMoEBlock(model_cfg, moe_cfg) for i in range(model_cfg.num_layers)})
        self.norm = RMSNorm(d)
        self.stp_blocks = nn.ModuleDict(
            {str(j): TimeSTPBlock(model_cfg, moe_cfg) for j in range(model_cfg.num_stp_blocks)}
        )
        self.head = ResidualMLP(d, d, self.num_quantiles * p, model_cfg.dropout)

    # ----------------------------------------------------------------------------- stages
    def rope(self, num_patches: int, like: torch.Tensor):
        cfg = self.model_cfg
        return rope_cos_sin(num_patches, cfg.hidden_size // cfg.num_heads, cfg.rope_theta, like.device, like.dtype)

    def embed_patches(self, values_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """[B, L] normalized values and mask (L a multiple of P) -> h0 [B, N, D]."""
        p = self.model_cfg.patch_points
        batch, length = values_BL.shape
        if length % p:
            raise ValueError(f"input length {length} is not a multiple of the patch length {p}")
        tokens = torch.cat(
            [values_BL.view(batch, length // p, p), mask_BL.to(values_BL.dtype).view(batch, length // p, p)], dim=-1
        )
        return self.embed(tokens)

    def main_stack(self, h_BND: torch.Tensor, rope, records: list[RouterRecord],
                   attn_mask_B1NN: torch.Tensor | None = None, token_valid_BN: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The TimeMoE blocks this module holds (the final norm is the caller's)."""
        for layer in self.layers.values():
            h_BND, record = layer(h_BND, rope, attn_mask_B1NN, token_valid_BN)
            records.append(record)
        return h_BND

    def head_quantiles(self, h_BND: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, Q, P]; the released head's output is quantile-major."""
        out = self.head(h_BND)
        return out.view(*h_BND.shape[:-1], self.num_quantiles, self.model_cfg.patch_points)

    # ----------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor, mask_BL: torch.Tensor, h0_BND: torch.Tensor | None = None) -> TimerS1Output:
        """Dense training forward of the units this module holds.

        With the patch embedding (the whole model, or the first pipeline stage) ``x`` is the
        normalized context [B, L]; without it ``x`` is the hidden state [B, N, D] the previous
        stage handed over, and ``h0_BND`` its patch embeddings. ``mask_BL`` is the context's
        observation mask in either case: padding masks and RoPE positions come from it.
        """
        cfg = self.model_cfg
        if self.embed is not None:
            h0_BND = x = self.embed_patches(x, mask_BL)
        rope = self.rope(mask_BL.shape[1] // cfg.patch_points, x)
        attn_mask, token_valid = padding_masks(mask_BL, cfg.patch_points)
        records: list[RouterRecord] = []
        horizons, predictions = [], []
        h = self.main_stack(x, rope, records, attn_mask, token_valid)
        block_ids = [int(name) for name in self.layers]
        if self.norm is not None:  # the main stack ends in this module: it predicts horizon 0
            h = self.norm(h)
            horizons.append(0)
            predictions.append(self.head_quantiles(h))
        for name, block in self.stp_blocks.items():
            h, record = block(h, h0_BND, rope, attn_mask, token_valid)
            records.append(record)
            block_ids.append(cfg.num_layers + int(name))
            horizons.append(int(name) + 1)
            predictions.append(self.head_quantiles(h))
        return TimerS1Output(h, h0_BND if cfg.num_stp_blocks else None, horizons, predictions, records, block_ids)

    # ----------------------------------------------------------------------------- inference
    @property
    def points_per_pass(self) -> int:
        return (len(self.stp_blocks) + 1) * self.model_cfg.patch_points

    @torch.no_grad()
    def forecast_pass(self, values_BL: torch.Tensor, mask_BL: torch.Tensor, num_points: int) -> torch.Tensor:
        """Quantiles [B, Q, num_points] (num_points <= (H+1)*P) after the last input patch."""
        p = self.model_cfg.patch_points
        if not 1 <= num_points <= self.points_per_pass:
            raise ValueError(f"num_points={num_points} must be in [1, {self.points_per_pass}]")
        h0 = self.embed_patches(values_BL, mask_BL)
        rope = self.rope(h0.shape[1], h0)
        records: list[RouterRecord] = []
        h = self.norm(self.main_stack(h0, rope, records))
        pieces = [self.head_quantiles(h[:, -1:])[:, 0]]
        # Only the blocks the horizon reaches run: block j predicts points [j*P, (j+1)*P).
        for block in list(self.stp_blocks.values())[: math.ceil(num_points / p) - 1]:
            h, _ = block(h, h0, rope)
            pieces.append(self.head_quantiles(h[:, -1:])[:, 0])
        return torch.cat(pieces, dim=-1)[..., :num_points]


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """normal(0, std) for Linear and expert weights, zero biases, ones for norms (QK-norms too)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, HeadRMSNorm)):
            module.reset_parameters()
    for name, param in model.named_parameters():
        if name.endswith(("w_gate_EFD", "w_up_EFD", "w_down_EDF")):
            nn.init.normal_(param, 0.0, std)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> TimerS1:
    """A freshly initialised model; on the meta device nothing is allocated or initialised."""
    device = torch.device(device)
    with torch.device(device):
        model = TimerS1(model_cfg, moe_cfg)
    if device.type != "meta":
        generator_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        init_weights(model, model_cfg.init_std)
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return model
