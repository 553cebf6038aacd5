"""Window augmentations (Timer-S1 paper, section 4.1), vectorised over a batch of rows.

- Value flipping: the whole window, input and target alike, times -1. Flipping is its own
  inverse, and because the loader flips whole windows the forecast target stays consistent with
  its context.
- Fourier-basis resampling: a segment of m points becomes a window of n points by truncating
  (n < m, down-sampling, which also low-passes so nothing aliases) or zero-padding (n > m,
  up-sampling) its real spectrum. Sample j of the output sits at time j * m / n of the input,
  so a sinusoid keeps its frequency in input time units: k cycles in the segment stay k cycles
  in the window. The segment is first detrended by the line through its end points, which is
  resampled exactly and added back; this stops the jump between the segment's last and first
  point (which the DFT sees as periodic) from ringing through the window.
"""

from __future__ import annotations

import numpy as np


def flip_sign(values: np.ndarray, flip_rows: np.ndarray) -> np.ndarray:
    """values [B, W] with the rows where flip_rows is True multiplied by -1 (in place)."""
    values[flip_rows] *= -1.0
    return values


def fourier_resample(segments: np.ndarray, out_points: int) -> np.ndarray:
    """Resample each row of segments [N, m] to out_points samples (float32 [N, out_points])."""
    segments = np.asarray(segments, dtype=np.float64)
    m = segments.shape[-1]
    if m == out_points:
        return segments.astype(np.float32)
    first, last = segments[:, :1], segments[:, -1:]
    slope = (last - first) / max(m - 1, 1)
    t_in = np.arange(m, dtype=np.float64)
    detrended = segments - (first + slope * t_in)
    spectrum = np.fft.rfft(detrended, axis=-1)
    out_bins = out_points // 2 + 1
    resized = np.zeros((segments.shape[0], out_bins), dtype=np.complex128)
    keep = min(out_bins, spectrum.shape[-1])
    resized[:, :keep] = spectrum[:, :keep]
    if out_points > m and m % 2 == 0:
        # The input's Nyquist bin stands for cos(pi t), which an up-sampled grid would split
        # between +/- frequencies; keep half of it, as scipy.signal.resample does.
        resized[:, m // 2] *= 0.5
    elif out_points < m and out_points % 2 == 0:
        resized[:, -1] = resized[:, -1].real  # the output's Nyquist bin must be real
    body = np.fft.irfft(resized, n=out_points, axis=-1) * (out_points / m)
    t_out = np.arange(out_points, dtype=np.float64) * (m / out_points)
    return (body + first + slope * t_out).astype(np.float32)
