"""Training objective of Timer-S1: weighted quantile loss over NTP + STP horizons, plus routing losses.

Layout of a training window (values and mask, ``[B, W]`` points):
  the first N patches are the model input (``context_patches``); position i (0-based) of
  horizon j (j = 0 for the main stack, j = 1..H for STP block j) predicts patch ``i + 1 + j``
  of the window. Targets that run past the window, or points whose mask is 0 (padding), are
  masked out, and so are positions whose own input patch is pure padding (nothing to predict
  from; see ``timers1.model.timer_s1.padding_masks``). A window of (N + H + 1)
  patches supervises every position at every horizon.

Normalisation prefix (``norm_prefix_min_fraction``, 0 = off): with it off, a window is
normalised with the statistics of its whole observed context, as a forecast is. In training that
leaks: every position but the last sees inputs normalised with the mean and spread of points it
has not yet seen, so "the rest of the window brings the mean back to 0" is a lesson the loss
rewards at every earlier position; at inference (prefix mean exactly 0) it turns into a forecast
pulled back to the context mean, and trends are not carried forward. With the option on, each
window is normalised with the statistics of its first c observed context patches only, c drawn
uniformly in [ceil(fraction x n), n] for n observed patches, and only positions from the c-th
observed patch on are scored: no scored position sees a statistic of its future. The position at
the c-th patch is exactly the forecast situation; later ones are those of an autoregressive
rollout (generated patches normalised with the context's statistics). The draw is a function of
the window's own values (``window_uniform``), so every pipeline stage and tensor-parallel rank
recomputes it without another tensor in flight, and a resumed or re-laid-out run draws the same.
Validation scores the forecast situation alone (fraction 1: statistics of the whole context,
the last position only) whatever the training option, so runs with and without it compare.

Per-patch loss (paper 3.3), on de-normalized values:
  ``wQL_q = 2 * sum_t pinball_q(x_t, xhat_t) / denom``, averaged over the Q quantiles, where
  ``denom = max(sum_t |x_t|, n_t * floor * s)`` over the observed target points t, with s the
  series' normalization scale (std + 1e-5) and ``floor = WQL_DENOMINATOR_FLOOR``.
  Why the floor: a patch whose values are all zero (intermittent demand) has no relative error
  at all (0/0), and a patch that barely leaves zero makes the ratio explode. With the floor,
  such patches are scored as a pinball loss relative to the series scale instead, which is
  finite, scale-invariant and continuous with the plain wQL where |x| is not small.
Patch losses are averaged over all (batch, position) pairs that have at least one observed
target point.

Denominator ``series_scale`` (``train.wql_denominator``; the paper's is ``abs_target``):
``denom = n_t * s_loss``, a pinball loss in the window's normalised units. sum|x| makes a patch's
weight proportional to std/level of its series, so a series far from zero (births, hospital
admissions, electricity load: most real data) weighs tens of times less than a zero-centred
synthetic one, and a model trained on mostly synthetic data learns little about the former.
``s_loss = max(s, SERIES_SCALE_FLOOR_FRACTION * r)`` (``series_loss_scale``), r the RMS distance of
the window's observed points past the context from the context mean. Why: with ``s`` alone a
window whose context is flat (s ~ 1e-5) and whose future moves (an intermittent series switching
on, a level shift) scores its future at 1e4-1e9 normalised units: that one window's loss was up
to 91,000x the batch median, and since gradient clipping scales the whole step, the step was
spent on it. The floor caps the future's normalised distance at 1 / fraction (here 5), which
touches ~0.7% of the built-in corpus's windows (those already more than 5 context stds away),
so a window's loss is bounded relative to its batch while ordinary windows keep ``s``.

The objective (``stage_loss``, the one place the terms are combined)::

    L = L_NTP + (1/H) sum_j w_j L_STP,j + aux_coef * mean_b aux_b + z_coef * mean_b z_b

with w_j = 1 (pre-training) or 1/sqrt(j) (CPT), aux_b the Switch load-balancing loss and z_b
the router z-loss of MoE block b. Every term is a sum over horizons or blocks, so the loss of a
whole model is the sum of the losses of its pipeline stages: a stage scores the horizons it
predicts and the blocks it runs, with the same function.

Router losses are taken over the **global microbatch**: tokens-per-expert counts are summed
over every rank that holds other tokens of the same stage (dp x tp, through
``LossShare.sum_over_batch_ranks``), so f_e is the fraction over the whole microbatch, exactly
as one process computes it on the concatenated batch. The probability term P_e and the z-loss
are linear in the tokens, so each rank adds its share ``sum_t p_te / T_total``; their gradient
is multiplied by dp because data parallelism averages gradients over the dp ranks (the tp
ranks' shares are summed, by DTensor or the expert mesh).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from timers1.model import instance_normalize
from timers1.model.timer_s1 import observed_patches
from timers1.model.moe import RouterRecord

WQL_DENOMINATOR_FLOOR = 0.1
SERIES_SCALE_FLOOR_FRACTION = 0.2


def window_uniform(values_BW: torch.Tensor) -> torch.Tensor:
    """``[B]`` float in [0, 1): a draw that is a function of each window's values alone.

    Integer arithmetic on the float32 bit patterns, so every device and rank that holds the same
    window computes the same number (module docstring: why not the loader's generator).
    """
    bits_BW = values_BW.float().contiguous().view(torch.int32).to(torch.int64)
    position_W = torch.arange(1, values_BW.shape[1] + 1, device=values_BW.device, dtype=torch.int64)
    # |bits| < 2^31 and positions <= W: the sum is below 2^31 W^2, inside int64 for W < 2^16.
    hashed_B = torch.remainder((bits_BW * position_W).sum(dim=-1), _HASH_PRIME)
    hashed_B = torch.remainder(hashed_B * 48271 + 11, _HASH_PRIME)
    return hashed_B.to(torch.float64) / _HASH_PRIME


_HASH_PRIME = 2_147_483_647


@dataclass
class NormalizedWindow:
    """How one batch of windows is normalised and which of its positions the loss scores."""

    context_BL: torch.Tensor
    """The normalised context (padding exactly 0): the model's input."""
    mean_B1: torch.Tensor
    scale_B1: torch.Tensor
    """Statistics of the normalisation prefix (std + 1e-5, as ``instance_normalize``)."""
    scored_BN: torch.Tensor | None
    """bool: positions the loss may score (None: every position with an observed input)."""
    after_stats_BW: torch.Tensor
    """Observed points past the normalisation prefix, context and targets (the loss floor's 'future')."""


def normalize_window(values_BW: torch.Tensor, mask_BW: torch.Tensor, context_points: int, patch_points: int,
                     prefix_min_fraction: float = 0.0) -> NormalizedWindow:
    """Normalise each window's context with the statistics of its normalisation prefix (module docstring)."""
    context_BL, context_mask_BL = values_BW[:, :context_points], mask_BW[:, :context_points]
    if prefix_min_fraction <= 0:
        normed_BL, mean_B1, scale_B1 = instance_normalize(context_BL, context_mask_BL)
        after_BW = torch.cat([torch.zeros_like(context_mask_BL), mask_BW[:, context_points:]], dim=1)
        return NormalizedWindow(normed_BL, mean_B1, scale_B1, None, after_BW)
    prefix_BN = observed_patches(context_mask_BL, patch_points).to(torch.int64).cumsum(dim=-1)
    observed_B1 = prefix_BN[:, -1:]
    lowest_B1 = torch.ceil(prefix_min_fraction * observed_B1.to(torch.float64)).to(torch.int64).clamp_min(1)
    choices_B1 = (observed_B1 - lowest_B1 + 1).clamp_min(1)
    drawn_B1 = lowest_B1 + (window_uniform(values_BW).view(-1, 1) * choices_B1).to(torch.int64)
    stats_patches_B1 = torch.minimum(drawn_B1, observed_B1)
    in_stats_BL = (prefix_BN <= stats_patches_B1).repeat_interleave(patch_points, dim=1).to(context_mask_BL.dtype)
    _, mean_B1, scale_B1 = instance_normalize(context_BL, context_mask_BL * in_stats_BL)
    normed_BL = (context_BL - mean_B1) / scale_B1 * context_mask_BL.to(context_BL.dtype)
    after_BW = torch.cat([context_mask_BL * (1 - in_stats_BL), mask_BW[:, context_points:]], dim=1)
    return NormalizedWindow(normed_BL, mean_B1, scale_B1, prefix_BN >= stats_patches_B1, after_BW)


def series_loss_scale(values_BW: torch.Tensor, after_stats_BW: torch.Tensor, mean_B1: torch.Tensor,
                      scale_B1: torch.Tensor) -> torch.Tensor:
    """``[B]``: the ``series_scale`` denominator's scale, ``max(s, fraction * r)`` (module docstring)."""
    after_BW = after_stats_BW.to(values_BW.dtype)
    squared_B = ((values_BW - mean_B1) ** 2 * after_BW).sum(dim=-1)
    rms_B = (squared_B / after_BW.sum(dim=-1).clamp_min(1.0)).sqrt()
    return torch.maximum(scale_B1.view(-1), SERIES_SCALE_FLOOR_FRACTION * rms_B)


def target_patches(values_BW: torch.Tensor, mask_BW: torch.Tensor, patch_points: int, context_patches: int,
                   num_horizons: int, scored_BN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and their mask ``[B, J, N, P]`` for J horizons (j = 0 main stack, then STP).

    The mask is 0 for padding, for targets past the window, for every target of a position
    whose input patch is pure padding, and for positions outside ``scored_BN`` when given.
    """
    batch, width = values_BW.shape
    if width % patch_points:
        raise ValueError(f"window length {width} is not a multiple of the patch length {patch_points}")
    needed = (context_patches + num_horizons) * patch_points
    if width < needed:
        # Targets past the window: zero values with mask 0.
        values_BW = torch.nn.functional.pad(values_BW, (0, needed - width))
        mask_BW = torch.nn.functional.pad(mask_BW, (0, needed - width))
    patches = values_BW.view(batch, -1, patch_points)
    masks = mask_BW.to(values_BW.dtype).view(batch, -1, patch_points)
    idx = torch.arange(context_patches, device=values_BW.device)
    gather = (idx[None, :] + 1 + torch.arange(num_horizons, device=values_BW.device)[:, None])  # [J, N]
    # A position whose own input patch is pure padding has nothing to predict from: skip it.
    scored = masks[:, :context_patches].amax(dim=-1) > 0
    if scored_BN is not None:
        scored = scored & scored_BN
    return patches[:, gather], masks[:, gather] * scored[:, None, :, None].to(masks.dtype)


WQL_DENOMINATORS = ("abs_target", "series_scale")


def weighted_quantile_loss(pred_BJNQP: torch.Tensor, target_BJNP: torch.Tensor, mask_BJNP: torch.Tensor,
                           quantiles: torch.Tensor, scale_B: torch.Tensor,
                           denominator: str = "abs_target") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch wQL averaged over quantiles ``[B, J, N]`` and whether each patch counts.

    All inputs on the de-normalized scale; ``scale_B`` is the series scale of the denominator
    (``series_loss_scale`` for ``series_scale``). See the module docstring for the denominators.
    """
    error = target_BJNP.unsqueeze(3) - pred_BJNQP  # [B, J, N, Q, P]
    q = quantiles.view(1, 1, 1, -1, 1).to(pred_BJNQP.dtype)
    pinball = torch.maximum(q * error, (q - 1) * error) * mask_BJNP.unsqueeze(3)
    numer_BJNQ = 2.0 * pinball.sum(dim=-1)
    observed = mask_BJNP.sum(dim=-1)
    if denominator == "series_scale":
        denom = observed * scale_B.view(-1, 1, 1)
    elif denominator == "abs_target":
        abs_sum = (target_BJNP.abs() * mask_BJNP).sum(dim=-1)
        denom = torch.maximum(abs_sum, observed * WQL_DENOMINATOR_FLOOR * scale_B.view(-1, 1, 1))
    else:
        raise ValueError(f"wQL denominator {denominator!r}: expected one of {WQL_DENOMINATORS}")
    denom = denom.clamp_min(torch.finfo(pred_BJNQP.dtype).tiny)
    return (numer_BJNQ / denom.unsqueeze(-1)).mean(dim=-1), observed > 0


def denormalized_quantile_loss(pred_BJNQP: torch.Tensor, mean_B1: torch.Tensor, scale_B1: torch.Tensor,
                               target_BJNP: torch.Tensor, mask_BJNP: torch.Tensor, quantiles: torch.Tensor,
                               denominator_scale_B: torch.Tensor, denominator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``weighted_quantile_loss`` of normalised predictions brought back to each series' scale.

    The part of ``stage_loss`` that works on [B, J, N, Q, P] tensors (ten times the size of any
    activation of a small model), so it is the unit ``train.compile`` fuses (``compiled_loss``).
    """
    pred_BJNQP = pred_BJNQP * scale_B1.view(-1, 1, 1, 1, 1) + mean_B1.view(-1, 1, 1, 1, 1)
    return weighted_quantile_loss(pred_BJNQP, target_BJNP, mask_BJNP, quantiles,
                                  denominator_scale_B.to(pred_BJNQP.dtype), denominator)


@functools.cache
def compiled_loss() -> Callable:
    """``denormalized_quantile_loss`` under torch.compile (built once per process)."""
    return torch.compile(denormalized_quantile_loss)


def stp_weights(num_stp: int, weighting: str) -> list[float]:
    """Weight of STP horizon j = 1..H inside ``(1/H) sum_j w_j L_j``: 1 (pre-training) or 1/sqrt(j) (CPT)."""
    if weighting == "uniform":
        return [1.0] * num_stp
    if weighting == "inv_sqrt":
        return [1.0 / math.sqrt(j) for j in range(1, num_stp + 1)]
    raise ValueError(f"unknown STP weighting {weighting!r}")


def valid_router_tokens(record: RouterRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs_TE, experts_TK, logits_TE) of the tokens routing losses count (not pure padding)."""
    routing = record.routing
    if record.token_valid_T is None:
        return routing.probs_TE, routing.experts_TK, record.logits_TE
    keep = record.token_valid_T
    return routing.probs_TE[keep], routing.experts_TK[keep], record.logits_TE[keep]


@dataclass(frozen=True)
class LossConfig:
    """Every option of the objective, built once from the run config (``from_config``)."""

    quantiles: tuple[float, ...]
    patch_points: int
    context_points: int
    num_stp_blocks: int
    num_blocks: int
    """MoE blocks in the whole model (L + H): router losses are averaged over them."""
    stp_weighting: str = "uniform"
    wql_denominator: str = "abs_target"
    norm_prefix_min_fraction: float = 0.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    compile: bool = False
    """Score through ``compiled_loss``: set by the engine from ``train.compile`` (``engine.uses_compile``
    decides whether this machine can compile), never by ``from_config``."""

    def __post_init__(self) -> None:
        if self.wql_denominator not in WQL_DENOMINATORS:
            raise ValueError(f"wQL denominator {self.wql_denominator!r}: expected one of {WQL_DENOMINATORS}")
        stp_weights(self.num_stp_blocks, self.stp_weighting)  # raises on an unknown weighting

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        m, t = cfg.model, cfg.train
        return cls(tuple(m.quantiles), m.patch_points, cfg.data.context_points, m.num_stp_blocks,
                   m.num_layers + m.num_stp_blocks, t.stp_weighting, t.wql_denominator, t.norm_prefix_min_fraction,
                   cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef)

    def horizon_weight(self, j: int) -> float:
        """Weight of horizon j in the objective: 1 for NTP, w_j / H for STP block j."""
        if j == 0:
            return 1.0
        return stp_weights(self.num_stp_blocks, self.stp_weighting)[j - 1] / self.num_stp_blocks

    @property
    def report_size(self) -> int:
        """Layout of a loss report: [total][horizon 0..H][sum of aux over blocks][sum of z over blocks]."""
        return self.num_stp_blocks + 4


@dataclass
class LossShare:
    """What part of the global step one call of ``stage_loss`` sees (all 1 in one process)."""

    dp: int = 1
    """Data-parallel ranks: gradients are averaged over them."""
    tp: int = 1
    """Tensor-parallel ranks: each computes the same horizon losses on gathered predictions."""
    num_microbatches: int = 1
    grad_scale: float = 1.0
    """Multiplies the objective's gradient (1 / gradient-accumulation steps)."""
    sum_over_batch_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Sums a tensor over the ranks holding other tokens of this stage (dp x tp); None: no others."""


def router_losses(record: RouterRecord, share: LossShare) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the Switch aux loss ``E * sum_e f_e * P_e`` and of the z-loss of one block.

    f_e (fraction of the routed slots on expert e, over the global microbatch) carries no
    gradient; P_e (mean router probability of e) does. Fully padded tokens are left out: they
    are not data, and a gradient into them is what the padding attention mask exists to prevent.
    """
    probs_TE, experts_TK, logits_TE = valid_router_tokens(record)
    num_experts, top_k = probs_TE.shape[-1], experts_TK.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(torch.float32)
    if share.sum_over_batch_ranks is not None:
        counts_E = share.sum_over_batch_ranks(counts_E)
    total_slots = counts_E.sum().clamp_min(1.0)
    total_tokens = total_slots / top_k
    aux = num_experts * (counts_E / total_slots * probs_TE.float().sum(dim=0)).sum() / total_tokens
    z = torch.logsumexp(logits_TE.float(), dim=-1).pow(2).sum() / total_tokens
    return aux, z


def stage_loss(out, values_BW: torch.Tensor, mask_BW: torch.Tensor, cfg: LossConfig,
               share: LossShare = LossShare()) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective of one forward (a whole model or a pipeline stage) and its loss report.

    ``out`` is the model's ``TimerS1Output`` (its predictions plain tensors); ``values_BW`` and
    ``mask_BW`` the raw windows: the first ``cfg.context_points`` points are the input, the rest
    the targets. Returns (objective scaled by ``share.grad_scale``, for backward; report
    [``cfg.report_size``] float64, detached), where report entries are this rank's share of the
    step's mean: summed over every rank and microbatch they give the losses one process would
    log for the global batch (``LossParts.from_report``).
    """
    report = torch.zeros(cfg.report_size, dtype=torch.float64, device=values_BW.device)
    objective = values_BW.new_zeros((), dtype=torch.float32)
    if out.predictions:
        window = normalize_window(values_BW, mask_BW, cfg.context_points, cfg.patch_points,
                                  cfg.norm_prefix_min_fraction)
        denominator_scale_B = (series_loss_scale(values_BW, window.after_stats_BW, window.mean_B1, window.scale_B1)
                               if cfg.wql_denominator == "series_scale" else window.scale_B1.view(-1))
        pred_BJNQP = torch.stack(out.predictions, dim=1)
        target, target_mask = target_patches(values_BW, mask_BW, cfg.patch_points, pred_BJNQP.shape[2],
                                             max(out.horizons) + 1, window.scored_BN)
        # A model or stage predicts consecutive horizons: its targets are a slice.
        scored = slice(out.horizons[0], out.horizons[-1] + 1)
        # The dtype the de-normalised predictions get (fp32 statistics promote bf16 predictions).
        loss_dtype = torch.promote_types(pred_BJNQP.dtype, window.scale_B1.dtype)
        loss_fn = compiled_loss() if cfg.compile else denormalized_quantile_loss
        wql_BJN, valid_BJN = loss_fn(
            pred_BJNQP, window.mean_B1, window.scale_B1, target[:, scored].to(loss_dtype),
            target_mask[:, scored].to(loss_dtype), torch.tensor(cfg.quantiles, device=values_BW.device),
            denominator_scale_B, cfg.wql_denominator)
        for i, j in enumerate(out.horizons):
            loss_j = masked_mean(wql_BJN[:, i], valid_BJN[:, i])
            objective = objective + cfg.horizon_weight(j) * loss_j
            report[1 + j] = loss_j.detach().double() / (share.dp * share.tp * share.num_microbatches)
            report[0] += cfg.horizon_weight(j) * report[1 + j]
    if (cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0) and out.router_records:
        # dp: undo the data-parallel gradient average for terms that are already global sums.
        router_weight = share.dp / cfg.num_blocks
        for record in out.router_records:
            aux, z = router_losses(record, share)
            objective = objective + router_weight * (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z)
            aux, z = aux.detach().double() / share.num_microbatches, z.detach().double() / share.num_microbatches
            report[-2] += aux
            report[-1] += z
            report[0] += (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z) / cfg.num_blocks
    return objective * share.grad_scale, report


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp_min(1)


@dataclass
class LossParts:
    total: torch.Tensor
    ntp: torch.Tensor
    stp_per_horizon: list[torch.Tensor] = field(default_factory=list)
    aux: torch.Tensor | None = None
    z: torch.Tensor | None = None

    @classmethod
    def from_report(cls, report: torch.Tensor, cfg: LossConfig) -> "LossParts":
        """The logged losses from a report summed over ranks and microbatches (see ``stage_loss``)."""
        per_horizon = list(report[1:cfg.num_stp_blocks + 2])
        aux = report[-2] / cfg.num_blocks if cfg.aux_loss_coef > 0 else None
        z = report[-1] / cfg.num_blocks if cfg.z_loss_coef > 0 else None
        return cls(report[0], per_horizon[0], per_horizon[1:], aux, z)

    def as_floats(self) -> dict[str, float]:
        out = {"loss": self.total.item(), "loss_ntp": self.ntp.item()}
        if self.stp_per_horizon:
            stp = torch.stack([x.detach() for x in self.stp_per_horizon])
            out["loss_stp"] = stp.mean().item()
            for j, value in enumerate(stp.tolist(), start=1):
                out[f"loss_stp_{j}"] = value
        if self.aux is not None:
            out["loss_aux"] = self.aux.item()
        if self.z is not None:
            out["loss_z"] = self.z.item()
        return out


