"""A link between two hosts as the throughput model costs it: latency + bytes / bandwidth, fitted to a probe.

`link_probe.py` times the process group's all-reduce and one-way sends between two hosts, back to back
(`sustained`) and after a pause (`idle`). This module fits them (pure functions, no I/O):
- an unshaped link: one line `t = latency + n / bandwidth` per operation, fitted to the faster of the two
  times at each size;
- a token-bucket shaped link (tc tbf): transfers pass at line speed while the bucket holds tokens, else at the
  sustained rate. `t = latency + max(n / line, n / sustained - bucket)` for a call after a full refill:
  the line figures come from the idle calls the bucket let through; the sustained bandwidth and the bucket
  depth (seconds of sustained traffic) from the idle calls it throttled (a line of slope 1 / sustained whose
  intercept is latency - bucket), else from the back-to-back times.
The all-reduce's bandwidth is its algorithm bandwidth (buffer bytes per second): whatever gloo's algorithm
moves per buffer byte over 2 ranks (a ring moves n each way) is folded in, and `bytes_per_direction` reports it
against the shaped rate. `cluster_on_link` puts the fits into a ClusterSpec in place of its all-reduce and
send figures, so the planner costs TP and PP over that link.
"""
from __future__ import annotations

import dataclasses
import statistics

from seesaw_ds.planner.clusters import ClusterSpec

THROTTLED = 0.5    # an idle call is throttled when its transfer time reaches this share of n / sustained


@dataclasses.dataclass(frozen=True)
class TransferFit:
    """One operation over the link: latency per call, line bandwidth, and, on a shaped link, the sustained
    bandwidth and the bucket depth (seconds of sustained traffic it lets through at line speed)."""
    latency: float
    line_bandwidth: float
    sustained_bandwidth: float | None = None
    bucket_seconds: float | None = None

    def __post_init__(self):
        if self.latency < 0 or not self.line_bandwidth > 0:
            raise ValueError(f"TransferFit: latency must be >= 0 and line_bandwidth > 0, got {self}")
        if (self.sustained_bandwidth is None) != (self.bucket_seconds is None):
            raise ValueError("TransferFit: a shaped fit needs both sustained_bandwidth and bucket_seconds")

    def seconds(self, nbytes: float, gap: float = float("inf")) -> float:
        """One call moving `nbytes`, `gap` seconds after the previous traffic (inf: a full bucket)."""
        line = nbytes / self.line_bandwidth
        if self.sustained_bandwidth is None:
            return self.latency + line
        return self.latency + max(line, nbytes / self.sustained_bandwidth - min(self.bucket_seconds, gap))


def weighted_line(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """(intercept, seconds per byte) of the line through (n, t), least squares on relative errors (the sizes
    span orders of magnitude). Unclamped: the intercept may be negative."""
    if len(sizes) != len(seconds) or not sizes:
        raise ValueError(f"a line fit needs equal, non-empty sizes and seconds, got {len(sizes)} and {len(seconds)}")
    if any(t <= 0 for t in seconds) or any(n < 0 for n in sizes):
        raise ValueError("a line fit needs positive seconds and non-negative sizes")
    # minimise sum(((a + n x) - t) / t)^2 over a and x: 2x2 normal equations
    w = [1 / t ** 2 for t in seconds]
    s11 = sum(w)
    s12 = sum(wi * n for wi, n in zip(w, sizes))
    s22 = sum(wi * n * n for wi, n in zip(w, sizes))
    b1 = sum(wi * t for wi, t in zip(w, seconds))
    b2 = sum(wi * n * t for wi, n, t in zip(w, sizes, seconds))
    det = s11 * s22 - s12 * s12
    if len(sizes) >= 2 and det > 1e-12 * s11 * s22:
        return (b1 * s22 - b2 * s12) / det, (s11 * b2 - s12 * b1) / det
    return min(seconds), 0.0


def fit_line(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """(latency, bandwidth) of `t = latency + n / bandwidth` (`weighted_line`); latency clamped at 0,
    bandwidth from the slowest call per byte if the slope is not positive."""
    latency, per_byte = weighted_line(sizes, seconds)
    if latency < 0:                       # refit the slope through the origin
        w = [1 / t ** 2 for t in seconds]
        latency = 0.0
        per_byte = (sum(wi * n * t for wi, n, t in zip(w, sizes, seconds))
                    / max(sum(wi * n * n for wi, n in zip(w, sizes)), 1e-300))
    if per_byte <= 0:
        per_byte = max([(t - latency) / n for n, t in zip(sizes, seconds) if n > 0] + [1e-12])
    return latency, 1 / per_byte


def fit_transfer(sizes: list[float], sustained: list[float], idle: list[float], shaped: bool) -> TransferFit:
    """The fit of one operation from its probe times (see the module docstring)."""
    if not (len(sizes) == len(sustained) == len(idle)) or len(sizes) < 2:
        raise ValueError("fit_transfer needs >= 2 sizes with one sustained and one idle time each")
    if not shaped:          # both regimes time the same line: the faster of the two (a busy machine only adds)
        return TransferFit(*fit_line(sizes, [min(s, i) for s, i in zip(sustained, idle)]))
    latency, bandwidth = fit_line(sizes, sustained)
    sustained_bw = bandwidth
    small = min(range(len(sizes)), key=lambda i: sizes[i])
    latency = min(idle[small], sustained[small])
    bucket = 0.0
    throttled = throttled_calls(sizes, idle, latency, sustained_bw)
    free = [i for i in range(len(sizes)) if i not in throttled]
    if len(throttled) >= 2:                 # t - latency = n / sustained - bucket on the throttled calls
        intercept, per_byte = weighted_line([sizes[i] for i in throttled], [idle[i] for i in throttled])
        if per_byte > 0:
            sustained_bw, bucket = 1 / per_byte, latency - intercept
    elif len(throttled) == 1:
        i = throttled[0]
        bucket = sizes[i] / sustained_bw - (idle[i] - latency)
    else:                                   # the bucket let even the largest call through
        bucket = max(sizes) / sustained_bw
    # the line: from the largest call surely under the bucket (small calls' times are latency plus noise;
    # a time within the latency's noise bounds the line from below)
    under = [i for i in free if sizes[i] / sustained_bw < bucket] or free
    line_bw = sustained_bw
    if under:
        i = max(under, key=lambda i: sizes[i])
        line_bw = max(sustained_bw, sizes[i] / max(idle[i] - latency, latency / 10, 1e-9))
    return TransferFit(latency, line_bw, sustained_bw, max(0.0, bucket))


def throttled_calls(sizes: list[float], idle: list[float], latency: float, sustained_bw: float) -> list[int]:
    """Indices of the idle calls the bucket throttled: each transfer outweighs the latency and took at least
    THROTTLED of n / sustained. A bucket throttles every call larger than one it throttled, so these are the
    largest sizes, down to the first that passed (a small call slowed by the machine is noise, not the bucket)."""
    throttled = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] / sustained_bw < 4 * latency or idle[i] - latency < THROTTLED * sizes[i] / sustained_bw:
            break
        throttled.append(i)
    return sorted(throttled)


def fit_probe(measured: dict, shaped: bool) -> tuple[TransferFit, TransferFit]:
    """(all-reduce fit, send fit) of a `link_probe.py` result. Where small all-reduces were timed between
    compute, the latency is at least what they took there beyond their transfer (the engine's regime)."""
    fits = []
    for op in ("allreduce", "p2p"):
        try:
            part = measured[op]
            fit = fit_transfer(part["sizes"], part["sustained"], part["idle"], shaped)
        except (KeyError, TypeError) as err:
            raise ValueError(f"link probe result has no usable {op!r} section: {err!r}") from None
        fits.append(with_busy_latency(fit, part.get("between_compute")))
    return fits[0], fits[1]


def with_busy_latency(fit: TransferFit, between: dict | None) -> TransferFit:
    """`fit` with its latency raised to the fastest small call's time between compute, less its transfer
    (the fastest: these times spread by up to 2x between calls of one probe, and a busy machine only adds)."""
    if not between or not between.get("seconds"):
        return fit
    beyond = min(t - n / fit.line_bandwidth for n, t in zip(between["sizes"], between["seconds"]))
    return dataclasses.replace(fit, latency=max(fit.latency, beyond))


def bytes_per_direction(allreduce: TransferFit, rate: float) -> float:
    """Bytes one all-reduce puts on each direction of a link shaped to `rate` bytes/s, per buffer byte
    (2 ranks: 1.0 for a ring or a direct exchange; 2.0 would mean reduce-then-broadcast in series)."""
    bandwidth = allreduce.sustained_bandwidth or allreduce.line_bandwidth
    return rate / bandwidth


def fit_link(measured: dict, ratio: float = 1.5) -> tuple[TransferFit, TransferFit, bool]:
    """(all-reduce fit, send fit, shaped) of a probe of a link not known to be rate-limited. The shaped fit
    is kept where it finds a bucket with a line at least `ratio` times its sustained rate, and the two
    operations' sustained rates agree within `ratio` (one limit on the host link caps both: a 2-rank
    all-reduce sends its buffer each way); else the unshaped fit (on an unshaped link the shaped fit finds
    no bucket, or sustained rates that differ as the operations' own costs do)."""
    fits = fit_probe(measured, shaped=True)
    bucket = any(f.bucket_seconds and f.line_bandwidth >= ratio * f.sustained_bandwidth for f in fits)
    rates = sorted(f.sustained_bandwidth for f in fits)
    if bucket and rates[1] <= ratio * rates[0]:
        return fits[0], fits[1], True
    return (*fit_probe(measured, shaped=False), False)


def cluster_on_link(base: ClusterSpec, allreduce: TransferFit, p2p: TransferFit, name: str | None = None
                    ) -> ClusterSpec:
    """`base` (its devices: compute, memory, host tier) with the all-reduce and send costs of the fitted link,
    at every degree (the probe has two hosts). A shaped fit sets the bucket: the mean of the two fits' depths
    (one bucket per host link carries both)."""
    return nodes_on_link(base, allreduce, p2p, node_size=None, name=name)


def nodes_on_link(base: ClusterSpec, allreduce: TransferFit, p2p: TransferFit, node_size: int | None,
                  name: str | None = None) -> ClusterSpec:
    """`base.num_devices` devices in nodes of `node_size` (None: one device per host, every degree over the
    link): all-reduces of degree <= node_size keep `base`'s figures (inside a node), larger ones and the
    pipeline's sends take the link's. The probe has two hosts: its all-reduce stands for every degree that
    crosses the link."""
    shaped = allreduce.sustained_bandwidth is not None and p2p.sustained_bandwidth is not None
    degrees = max(1, len(base.allreduce_bandwidth), base.num_devices - 1)
    inside = min(max((node_size or 1) - 1, 0), len(base.allreduce_bandwidth))   # table entries kept

    def table(own: tuple[float, ...], link: float) -> tuple[float, ...]:
        return tuple(own[:inside]) + (link,) * (degrees - inside)
    bucket = (allreduce.bucket_seconds + p2p.bucket_seconds) / 2 if shaped else None
    return dataclasses.replace(
        base, name=name or base.name,
        allreduce_bandwidth=table(base.allreduce_bandwidth, allreduce.line_bandwidth),
        allreduce_latency=table(base.allreduce_latency, allreduce.latency),
        p2p_bandwidth=p2p.line_bandwidth, p2p_latency=p2p.latency, link_bucket_seconds=bucket,
        allreduce_sustained_bandwidth=allreduce.sustained_bandwidth if shaped else None,
        p2p_sustained_bandwidth=p2p.sustained_bandwidth if shaped else None,
        node_size=node_size if node_size and node_size > 1 else None,
        source=f"{base.source}; link fitted by link_probe")
