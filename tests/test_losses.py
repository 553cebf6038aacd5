"""Loss values against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from timers1.kernels import Routing
from timers1.losses import (SERIES_SCALE_FLOOR_FRACTION, WQL_DENOMINATOR_FLOOR, LossConfig, LossParts, LossShare, router_losses, stage_loss,
                            masked_mean, normalize_window, series_loss_scale, stp_weights, target_patches,
                            weighted_quantile_loss, window_uniform)
from timers1.model import TimerS1Output, instance_normalize
from timers1.model.moe import RouterRecord

Q9 = torch.tensor([0.1 * i for i in range(1, 10)])


def test_wql_plain_patch():
    # targets [1, 3], every quantile predicts 2: errors -1 and +1, pinball (1-q) + q = 1 per q,
    # so wQL_q = 2 * 1 / (|1| + |3|) = 0.5 for every q.
    pred = torch.full((1, 1, 1, 9, 2), 2.0)
    wql, valid = weighted_quantile_loss(pred, torch.tensor([[[[1.0, 3.0]]]]), torch.ones(1, 1, 1, 2), Q9, torch.ones(1))
    assert valid.item()
    assert wql.item() == pytest.approx(0.5, abs=1e-6)


def test_wql_quantile_asymmetry():
    # target 0 and 10 (sum |x| = 10), prediction 4 for every quantile: errors -4 and +6.
    # pinball_q = 4(1-q) + 6q = 4 + 2q; wQL_q = 2(4 + 2q)/10; mean over q (mean q = 0.5) = 1.0.
    pred = torch.full((1, 1, 1, 9, 2), 4.0)
    wql, _ = weighted_quantile_loss(pred, torch.tensor([[[[0.0, 10.0]]]]), torch.ones(1, 1, 1, 2), Q9, torch.ones(1))
    assert wql.item() == pytest.approx(1.0, abs=1e-6)


def test_wql_zero_denominator_uses_series_scale():
    # All-zero target patch: sum |x| = 0, so the denominator is n * floor * scale = 2 * 0.1 * 2.
    # Prediction 1 everywhere: pinball = 2 (1 - q), wQL_q = 4(1 - q) / 0.4, mean over q = 5.0.
    assert WQL_DENOMINATOR_FLOOR == 0.1
    pred = torch.full((1, 1, 1, 9, 2), 1.0)
    wql, valid = weighted_quantile_loss(pred, torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), Q9, torch.tensor([2.0]))
    assert valid.item() and torch.isfinite(wql).all()
    assert wql.item() == pytest.approx(5.0, abs=1e-5)


def test_wql_masked_points_and_empty_patch():
    pred = torch.full((1, 1, 2, 9, 2), 2.0)
    target = torch.tensor([[[[1.0, 1000.0], [5.0, 5.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    wql, valid = weighted_quantile_loss(pred, target, mask, Q9, torch.ones(1))
    # Only the point (x=1, pred=2) counts: pinball (1-q), wQL_q = 2(1-q)/1, mean = 1.0.
    assert wql[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert valid.tolist() == [[[True, False]]]


def test_target_patches_layout_and_window_end_masking():
    values = torch.arange(10.0).view(1, 10)  # 5 patches of 2 points
    mask = torch.ones(1, 10)
    target, tmask = target_patches(values, mask, patch_points=2, context_patches=3, num_horizons=3)
    # horizon j, position i -> patch i + 1 + j; patches past the window (index >= 5) are masked.
    assert target[0, 0].tolist() == [[2, 3], [4, 5], [6, 7]]
    assert target[0, 2].tolist() == [[6, 7], [8, 9], [0, 0]]
    assert tmask[0, 2].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert tmask[0, 1].tolist() == [[1, 1], [1, 1], [1, 1]]


def test_target_patches_scores_only_the_positions_given():
    # Row 0: 6 observed context patches; row 1: 2 fully padded patches, then 4 observed.
    values = torch.arange(16.0).view(1, 16).repeat(2, 1)  # 8 patches of 2 points
    mask = torch.ones(2, 16)
    mask[1, :4] = 0
    _, everything = target_patches(values, mask, patch_points=2, context_patches=6, num_horizons=1)
    scored_BN = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    _, some = target_patches(values, mask, patch_points=2, context_patches=6, num_horizons=1, scored_BN=scored_BN)
    scored = lambda m: m[:, 0].amax(dim=-1).tolist()  # noqa: E731
    assert scored(everything) == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    # Padding positions stay unscored whatever scored_BN says.
    assert scored(some) == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 1]]


def _prefix_windows(batch: int = 64, patch_points: int = 4, context_patches: int = 12, seed: int = 0):
    """Random walks with 0-8 fully padded patches at the left and a part-padded first patch."""
    gen = torch.Generator().manual_seed(seed)
    width = (context_patches + 2) * patch_points
    values = torch.randn(batch, width, generator=gen).cumsum(dim=-1)
    mask = torch.ones(batch, width)
    pad_points = torch.randint(0, 8 * patch_points + 3, (batch,), generator=gen)
    mask[torch.arange(width)[None, :] < pad_points[:, None]] = 0
    return values * mask, mask


def test_normalize_window_without_a_prefix_is_the_whole_context():
    values, mask = _prefix_windows()
    context = 48
    window = normalize_window(values, mask, context, patch_points=4)
    normed, mean, scale = instance_normalize(values[:, :context], mask[:, :context])
    assert torch.equal(window.context_BL, normed) and torch.equal(window.mean_B1, mean)
    assert torch.equal(window.scale_B1, scale) and window.scored_BN is None
    assert torch.equal(window.after_stats_BW[:, :context], torch.zeros(len(values), context))
    assert torch.equal(window.after_stats_BW[:, context:], mask[:, context:])
    # Fraction 1 (the validation protocol): the same statistics, only the last position scored.
    last = normalize_window(values, mask, context, patch_points=4, prefix_min_fraction=1.0)
    torch.testing.assert_close(last.context_BL, normed, rtol=0, atol=1e-6)
    torch.testing.assert_close(last.mean_B1, mean, rtol=1e-6, atol=1e-6)
    assert last.scored_BN.sum(dim=-1).tolist() == [1] * len(values)
    assert last.scored_BN[:, -1].all()


def test_normalize_window_prefix_statistics_never_reach_a_scored_position():
    patch_points, context_patches, fraction = 4, 12, 0.25
    context = patch_points * context_patches
    values, mask = _prefix_windows(batch=200, patch_points=patch_points, context_patches=context_patches)
    window = normalize_window(values, mask, context, patch_points, prefix_min_fraction=fraction)
    drawn = []
    for b in range(len(values)):
        observed = [i for i in range(context_patches) if mask[b, i * patch_points:(i + 1) * patch_points].any()]
        scored = torch.nonzero(window.scored_BN[b]).view(-1).tolist()
        # Statistics come from the observed patches up to the first scored position, no further.
        stats_end = scored[0]
        c = observed.index(stats_end) + 1
        assert math.ceil(fraction * len(observed)) <= c <= len(observed)
        assert scored == list(range(stats_end, context_patches))
        in_stats = mask[b, :(stats_end + 1) * patch_points].bool()
        points = values[b, :(stats_end + 1) * patch_points][in_stats].double()
        mean, std = points.mean().item(), points.std(unbiased=False).item()
        assert window.mean_B1[b, 0].item() == pytest.approx(mean, rel=1e-4, abs=1e-4)
        assert window.scale_B1[b, 0].item() == pytest.approx(std + 1e-5, rel=1e-4, abs=1e-4)
        expected = (values[b, :context] - window.mean_B1[b]) / window.scale_B1[b] * mask[b, :context]
        torch.testing.assert_close(window.context_BL[b], expected)
        assert torch.equal(window.after_stats_BW[b, :(stats_end + 1) * patch_points],
                           torch.zeros((stats_end + 1) * patch_points))
        assert torch.equal(window.after_stats_BW[b, (stats_end + 1) * patch_points:],
                           mask[b, (stats_end + 1) * patch_points:])
        drawn.append((c - math.ceil(fraction * len(observed))) / max(len(observed) - math.ceil(fraction * len(observed)), 1))
    # The draw spreads over the allowed range, and depends on the window alone: the same
    # windows in another order and another batch draw the same prefixes.
    assert min(drawn) == 0.0 and max(drawn) == 1.0 and 0.35 < sum(drawn) / len(drawn) < 0.65
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(1))
    again = normalize_window(values[order[:50]], mask[order[:50]], context, patch_points, prefix_min_fraction=fraction)
    assert torch.equal(again.scored_BN, window.scored_BN[order[:50]])
    uniform = window_uniform(values)
    assert ((uniform >= 0) & (uniform < 1)).all() and len(set(uniform.tolist())) == len(values)


def _loop_loss(pred_norm, values, mask, mean, scale, quantiles, weights):
    """The objective spelled out with Python loops, independent of the vectorised code."""
    batch, num_h, num_pos, num_q, p = pred_norm.shape
    per_h = []
    for j in range(num_h):
        total, count = 0.0, 0
        for b in range(batch):
            for i in range(num_pos):
                if not any(mask[b, t].item() > 0 for t in range(i * p, (i + 1) * p)):
                    continue  # the input patch itself is pure padding: nothing to predict from
                start = (i + 1 + j) * p
                pts = [(values[b, t].item(), mask[b, t].item(), t - start) for t in range(start, start + p)
                       if t < values.shape[1]]
                obs = [(x, k) for x, m, k in pts if m > 0]
                if not obs:
                    continue
                denom = max(sum(abs(x) for x, _ in obs), len(obs) * 0.1 * scale[b].item())
                wq = 0.0
                for qi, q in enumerate(quantiles):
                    s = 0.0
                    for x, k in obs:
                        xhat = pred_norm[b, j, i, qi, k].item() * scale[b].item() + mean[b].item()
                        e = x - xhat
                        s += max(q * e, (q - 1) * e)
                    wq += 2 * s / denom
                total += wq / num_q
                count += 1
        per_h.append(total / count)
    return per_h[0] + sum(w * l for w, l in zip(weights, per_h[1:])) / (num_h - 1), per_h


@pytest.mark.parametrize("weighting", ["uniform", "inv_sqrt"])
def test_full_objective_matches_loop(weighting):
    gen = torch.Generator().manual_seed(0)
    batch, num_h, num_pos, p = 2, 3, 3, 4
    quantiles = [0.1, 0.5, 0.9]
    pred = torch.randn(batch, num_h, num_pos, 3, p, generator=gen)
    values = torch.randn(batch, 5 * p, generator=gen) * 3 + 1  # shorter than N + J patches
    mask = torch.ones(batch, 5 * p)
    mask[1, :6] = 0  # left padding in series 1
    values[1, :6] = 0
    _, mean, scale = instance_normalize(values[:, :num_pos * p], mask[:, :num_pos * p])
    out = TimerS1Output(None, None, list(range(num_h)), list(pred.unbind(1)))
    cfg = LossConfig(tuple(quantiles), p, num_pos * p, num_h - 1, num_blocks=4, stp_weighting=weighting)
    objective, report = stage_loss(out, values, mask, cfg, LossShare(grad_scale=0.5))
    parts = LossParts.from_report(report, cfg)
    expected_total, expected_h = _loop_loss(pred, values, mask, mean, scale, quantiles, stp_weights(2, weighting))
    assert objective.item() == pytest.approx(0.5 * expected_total, rel=1e-5)
    assert parts.ntp.item() == pytest.approx(expected_h[0], rel=1e-5)
    assert [x.item() for x in parts.stp_per_horizon] == pytest.approx(expected_h[1:], rel=1e-5)
    assert parts.total.item() == pytest.approx(expected_total, rel=1e-5)


def test_stp_weights():
    assert stp_weights(3, "uniform") == [1.0, 1.0, 1.0]
    assert stp_weights(4, "inv_sqrt") == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


def _record(probs, experts, num_experts):
    probs = torch.tensor(probs)
    experts = torch.tensor(experts)
    counts = torch.bincount(experts.view(-1), minlength=num_experts)
    routing = Routing(probs.gather(1, experts), experts, probs, counts, torch.argsort(experts.view(-1), stable=True))
    return RouterRecord(routing, probs.log())


def test_load_balancing_loss_by_hand():
    balanced = _record([[0.75, 0.25], [0.25, 0.75]], [[0], [1]], 2)
    assert router_losses(balanced, LossShare())[0].item() == pytest.approx(1.0)
    # Both tokens on expert 0: f = [1, 0], P = [0.85, 0.15] -> 2 * 0.85 = 1.7.
    skewed = _record([[0.9, 0.1], [0.8, 0.2]], [[0], [0]], 2)
    assert router_losses(skewed, LossShare())[0].item() == pytest.approx(1.7)
    # z-loss: mean over tokens of logsumexp(log p)^2 = log(1)^2 = 0 for normalised probabilities.
    assert router_losses(skewed, LossShare())[1].item() == pytest.approx(0.0, abs=1e-12)
    # Averaged over the model's blocks.
    out = TimerS1Output(None, None, router_records=[balanced, skewed], block_ids=[0, 1])
    cfg = LossConfig((0.5,), 2, 2, 0, num_blocks=2, aux_loss_coef=1.0)
    _, report = stage_loss(out, torch.ones(1, 4), torch.ones(1, 4), cfg)
    assert LossParts.from_report(report, cfg).aux.item() == pytest.approx(1.35)


def test_router_counts_are_summed_over_batch_ranks():
    """Two ranks holding one token each, both on expert 0: f = [1, 0] over the global batch;
    each rank's share of P is its own tokens' probabilities over the global token count."""
    rank0 = _record([[0.9, 0.1]], [[0]], 2)
    share = LossShare(sum_over_batch_ranks=lambda counts: counts * 2)  # the other rank routed the same
    aux, _ = router_losses(rank0, share)
    assert aux.item() == pytest.approx(2 * 1.0 * 0.9 / 2)


def test_aux_loss_enters_total_with_coefficient():
    # Context [1, 1] (mean 1), targets [2, 2]; the prediction 0 de-normalises to the mean 1:
    # pinball 0.5 per point, wQL = 2 * 1 / (|2| + |2|) = 0.5.
    out = TimerS1Output(None, None, [0], [torch.zeros(1, 1, 1, 2)], [_record([[0.9, 0.1], [0.8, 0.2]], [[0], [0]], 2)],
                        [0])
    values = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    cfg = LossConfig((0.5,), 2, 2, 0, num_blocks=1, aux_loss_coef=0.1)
    objective, report = stage_loss(out, values, torch.ones_like(values), cfg)
    parts = LossParts.from_report(report, cfg)
    assert parts.ntp.item() == pytest.approx(0.5)
    assert parts.total.item() == pytest.approx(0.5 + 0.1 * 1.7)
    assert objective.item() == pytest.approx(0.5 + 0.1 * 1.7)


def test_loss_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="denominator"):
        LossConfig((0.5,), 2, 2, 0, num_blocks=1, wql_denominator="nope")
    with pytest.raises(ValueError, match="weighting"):
        LossConfig((0.5,), 2, 2, 2, num_blocks=1, stp_weighting="nope")


def test_series_scale_denominator_is_the_pinball_loss_in_normalised_units():
    # One patch of 2 points around a level of 1000 with series scale 10; the median and the
    # 0.1/0.9 quantiles miss by 5 (half a scale unit).
    target = torch.tensor([1000.0, 1000.0]).view(1, 1, 1, 2)
    mask = torch.ones(1, 1, 1, 2)
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    pred = (target - 5.0).unsqueeze(3).expand(1, 1, 1, 3, 2)
    scale = torch.tensor([10.0])
    # Under-forecast by 5: pinball_q = q * 5 per point; 2 * sum over 2 points = 20 q; mean over q = 10.
    abs_target, _ = weighted_quantile_loss(pred, target, mask, quantiles, scale)
    series_scale, _ = weighted_quantile_loss(pred, target, mask, quantiles, scale, denominator="series_scale")
    assert abs_target.item() == pytest.approx(10.0 / 2000.0)  # sum |x| = 2000
    assert series_scale.item() == pytest.approx(10.0 / (2 * 10.0))  # n * scale = 20
    with pytest.raises(ValueError, match="denominator"):
        weighted_quantile_loss(pred, target, mask, quantiles, scale, denominator="nope")


def test_series_loss_scale_floors_a_flat_context_by_the_future_distance():
    # Context [4, 4, 4, 4] (std 0, scale 1e-5), future [4, 14] (RMS distance from the mean sqrt(50)):
    # the scale is the floor, fraction * sqrt(50). A moving context keeps its own std.
    values = torch.tensor([[4.0, 4.0, 4.0, 4.0, 4.0, 14.0], [0.0, 2.0, 0.0, 2.0, 1.0, 1.0]])
    mask = torch.ones_like(values)
    _, mean, scale = instance_normalize(values[:, :4], mask[:, :4])
    after_stats = normalize_window(values, mask, 4, patch_points=2).after_stats_BW
    loss_scale = series_loss_scale(values, after_stats, mean, scale)
    assert loss_scale[0].item() == pytest.approx(SERIES_SCALE_FLOOR_FRACTION * math.sqrt(50.0), rel=1e-6)
    assert loss_scale[1].item() == pytest.approx(scale[1].item())
    # An unobserved future adds no floor.
    mask[0, 4:] = 0
    after_stats = normalize_window(values, mask, 4, patch_points=2).after_stats_BW
    assert series_loss_scale(values, after_stats, mean, scale)[0].item() == pytest.approx(scale[0].item())


def test_no_window_dominates_a_batch_under_series_scale():
    # 15 windows of white noise and one whose context is flat and whose future jumps (an
    # intermittent series switching on). Every prediction is the context mean (what an untrained
    # model gives): without the floor that one window's loss is > 1e3 x the others' median; with
    # it, a few times.
    gen = torch.Generator().manual_seed(0)
    p, context, num_h = 4, 32, 2
    values = torch.randn(16, context + (num_h + 1) * p, generator=gen)
    values[0, :context] = 3.0
    values[0, context:] = 3.0 + 2.0 * torch.rand(values.shape[1] - context, generator=gen)
    mask = torch.ones_like(values)
    quantiles = tuple(0.1 * i for i in range(1, 10))
    cfg = LossConfig(quantiles, p, context, num_h - 1, num_blocks=2, wql_denominator="series_scale")
    pred = [torch.zeros(1, context // p, 9, p) for _ in range(num_h)]
    out = TimerS1Output(None, None, list(range(num_h)), pred)
    per_window = torch.stack([LossParts.from_report(stage_loss(out, values[b:b + 1], mask[b:b + 1], cfg)[1], cfg).total
                              for b in range(16)])
    others = per_window[1:].median().item()
    assert torch.isfinite(per_window).all()
    assert per_window[0].item() < 10 * others
    # The same window scored by the context scale alone (the old denominator) is what dominated.
    _, mean, scale = instance_normalize(values[:1, :context], mask[:1, :context])
    target, tmask = target_patches(values[:1], mask[:1], p, context // p, num_h)
    unfloored, valid = weighted_quantile_loss(torch.stack(pred, 1) * scale.view(-1, 1, 1, 1, 1) + mean.view(-1, 1, 1, 1, 1),
                                              target, tmask, torch.tensor(quantiles), scale.view(-1), "series_scale")
    assert masked_mean(unfloored[:, 0], valid[:, 0]).item() > 1e3 * others
    # Ordinary windows keep their context scale: the floor changes nothing for them.
    _, mean, scale = instance_normalize(values[1:, :context], mask[1:, :context])
    after_stats = normalize_window(values[1:], mask[1:], context, p).after_stats_BW
    assert torch.equal(series_loss_scale(values[1:], after_stats, mean, scale), scale.view(-1))


def test_compiled_loss_matches_eager_values_and_gradients():
    """``train.compile`` scores through torch.compile: same numbers, same gradient."""
    from timers1.losses import compiled_loss, denormalized_quantile_loss

    torch.manual_seed(0)
    pred = torch.randn(3, 2, 4, 9, 5, requires_grad=True)
    mean, scale = torch.randn(3, 1), torch.rand(3, 1) + 0.5
    target, mask = torch.randn(3, 2, 4, 5) * 2, (torch.rand(3, 2, 4, 5) > 0.2).float()
    results = []
    for fn in (denormalized_quantile_loss, compiled_loss()):
        wql, valid = fn(pred, mean, scale, target, mask, Q9, scale.view(-1) * 1.5, "series_scale")
        (grad,) = torch.autograd.grad((wql * valid).sum(), pred)
        results.append((wql.detach(), valid, grad))
    (wql_e, valid_e, grad_e), (wql_c, valid_c, grad_c) = results
    assert torch.equal(valid_e, valid_c)
    assert torch.allclose(wql_e, wql_c, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_e, grad_c, rtol=1e-5, atol=1e-7)
    assert grad_e.abs().sum() > 0
