"""Training objective of Timer-S1: weighted quantile loss over NTP + STP horizons, plus routing losses.

Layout of a training window (values and mask, ``[B, W]`` points):
  the first N patches are the model input (``context_patches``); position i (0-based) of
  horizon j (j = 0 for the main stack, j = 1..H for STP block j) predicts patch ``i + 1 + j``
  of the window. Targets that run past the window, or points whose mask is 0 (padding), are
  masked out, and so are positions whose own input patch is pure padding (nothing to predict
  from; see ``timers1.model.timer_s1.padding_masks``). A window of (N + H + 1)
  patches supervises every position at every horizon.

Prefix fraction (``min_prefix_fraction``, 0 = off): the window is normalised with the statistics
of its whole observed context, so an early position's input already encodes where the series
goes later (its mean and spread): the model learns "revert towards the window mean" there. At
inference a short series is normalised over exactly the points the model sees, and that lesson
turns into a forecast pulled back to the context mean (trending yearly and monthly series
suffered most). Scoring only positions whose observed prefix covers at least this fraction of
the window's observed context keeps the leak small; windows truncated by the loader
(``data.truncate_probability``) then teach short contexts with their own statistics. Measured
on the small CPU model (README, trials E vs F): no gain beyond noise once the denominator is
``series_scale``, so the recipes leave it off.

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
``denom = n_t * s``, a pinball loss in the window's normalised units. sum|x| makes a patch's
weight proportional to std/level of its series, so a series far from zero (births, hospital
admissions, electricity load: most real data) weighs tens of times less than a zero-centred
synthetic one, and a model trained on mostly synthetic data learns little about the former.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from timers1.model.moe import RouterRecord

WQL_DENOMINATOR_FLOOR = 0.1


def target_patches(values_BW: torch.Tensor, mask_BW: torch.Tensor, patch_points: int, context_patches: int,
                   num_horizons: int, min_prefix_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and their mask ``[B, J, N, P]`` for J horizons (j = 0 main stack, then STP).

    The mask is 0 for padding, for targets past the window, for every target of a position
    whose input patch is pure padding, and for positions whose observed prefix holds fewer than
    ``min_prefix_fraction`` of the window's observed context patches (module docstring).
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
    input_observed_BN = masks[:, :context_patches].amax(dim=-1) > 0
    scored_BN = input_observed_BN
    if min_prefix_fraction > 0:
        prefix_BN = input_observed_BN.to(torch.int64).cumsum(dim=-1)
        scored_BN = scored_BN & (prefix_BN >= min_prefix_fraction * prefix_BN[:, -1:])
    return patches[:, gather], masks[:, gather] * scored_BN[:, None, :, None].to(masks.dtype)


WQL_DENOMINATORS = ("abs_target", "series_scale")


def weighted_quantile_loss(pred_BJNQP: torch.Tensor, target_BJNP: torch.Tensor, mask_BJNP: torch.Tensor,
                           quantiles: torch.Tensor, scale_B: torch.Tensor,
                           denominator: str = "abs_target") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch wQL averaged over quantiles ``[B, J, N]`` and whether each patch counts.

    All inputs on the de-normalized scale. See the module docstring for the denominators.
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


def load_balancing_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Switch loss ``E * sum_e f_e * P_e`` per MoE block, averaged over blocks (1.0 when balanced).

    f_e (fraction of the T*K routed slots on expert e) carries no gradient; P_e (mean router
    probability of e) does. Fully padded tokens are left out: they are not data, and a
    gradient into them is what the padding attention mask exists to prevent.
    """
    losses = []
    for record in records:
        probs_TE, experts_TK, _ = valid_router_tokens(record)
        num_experts = probs_TE.shape[-1]
        counts = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
        fraction_E = counts / counts.sum().clamp_min(1.0)
        losses.append(num_experts * (fraction_E * probs_TE.mean(dim=0)).sum())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def router_z_loss(records: list[RouterRecord]) -> torch.Tensor:
    """Mean over tokens and blocks of logsumexp(router logits)^2 (ST-MoE); padding left out."""
    if not records:
        return torch.zeros(())
    return torch.stack([torch.logsumexp(valid_router_tokens(r)[2].float(), dim=-1).pow(2).mean() for r in records]).mean()


@dataclass
class LossParts:
    total: torch.Tensor
    ntp: torch.Tensor
    stp_per_horizon: list[torch.Tensor] = field(default_factory=list)
    aux: torch.Tensor | None = None
    z: torch.Tensor | None = None

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


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp_min(1)


def timer_s1_loss(
    pred_BJNQP: torch.Tensor,
    records: list[RouterRecord],
    values_BW: torch.Tensor,
    mask_BW: torch.Tensor,
    mean_B1: torch.Tensor,
    scale_B1: torch.Tensor,
    quantiles: list[float],
    stp_weighting: str = "uniform",
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    min_prefix_fraction: float = 0.0,
    wql_denominator: str = "abs_target",
) -> LossParts:
    """``L = L_NTP + (1/H) sum_j w_j L_STP,j + alpha * L_aux (+ z-loss)``.

    ``pred_BJNQP`` is in normalized units (as the model emits it); it is de-normalized with the
    context's mean and scale before the loss, as the paper computes wQL on raw values.
    """
    batch, num_horizons, context_patches, _, patch_points = pred_BJNQP.shape
    target, target_mask = target_patches(values_BW, mask_BW, patch_points, context_patches, num_horizons,
                                         min_prefix_fraction)
    pred = pred_BJNQP * scale_B1.view(-1, 1, 1, 1, 1) + mean_B1.view(-1, 1, 1, 1, 1)
    q = torch.tensor(quantiles, device=pred.device)
    wql_BJN, valid_BJN = weighted_quantile_loss(pred, target.to(pred.dtype), target_mask.to(pred.dtype), q,
                                                scale_B1.view(-1).to(pred.dtype), wql_denominator)
    per_horizon = [masked_mean(wql_BJN[:, j], valid_BJN[:, j]) for j in range(num_horizons)]
    ntp, stp = per_horizon[0], per_horizon[1:]
    total = ntp
    if stp:
        weights = stp_weights(len(stp), stp_weighting)
        total = total + sum(w * l for w, l in zip(weights, stp)) / len(stp)
    aux = z = None
    if aux_loss_coef > 0 and records:
        aux = load_balancing_loss(records)
        total = total + aux_loss_coef * aux
    if z_loss_coef > 0 and records:
        z = router_z_loss(records)
        total = total + z_loss_coef * z
    return LossParts(total, ntp, stp, aux, z)


def window_loss(model, values_BW: torch.Tensor, mask_BW: torch.Tensor, context_points: int, quantiles: list[float],
                stp_weighting: str = "uniform", aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                min_prefix_fraction: float = 0.0, wql_denominator: str = "abs_target"):
    """Normalize the context, run the model, score every horizon: the whole single-device step.

    Returns (LossParts, router records). The window holds the context followed by the future
    points that supervise the last positions (see the module docstring).
    """
    from timers1.model import instance_normalize

    context, context_mask = values_BW[:, :context_points], mask_BW[:, :context_points]
    normed, mean, scale = instance_normalize(context, context_mask)
    out = model(normed, context_mask)
    parts = timer_s1_loss(out.quantiles_BJNQP, out.router_records, values_BW, mask_BW, mean, scale, quantiles,
                          stp_weighting, aux_loss_coef, z_loss_coef, min_prefix_fraction, wql_denominator)
    return parts, out.router_records
