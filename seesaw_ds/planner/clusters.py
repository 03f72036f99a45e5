"""Hardware descriptions the throughput model reads: one device kind, its count, its links.

Units: bytes, bytes/s, FLOP/s, seconds. Vendor datasheets quote decimal GB and GB/s (1e9); memory capacity
is quoted in GB but is binary on the cards (a "24 GB" A10 holds 24 GiB), so capacities use GiB.

A spec string "8xA10" picks 8 devices of kind A10; "local" (or "2xlocal") is this machine, described by
micro-benchmarks (see `calibrate.py`).
"""
from __future__ import annotations

import dataclasses
import math
import re

GB = 1e9
GIB = 1024 ** 3
TFLOPS = 1e12

_DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float32": "float32", "fp32": "float32", "float": "float32"}


def canonical_dtype(dtype) -> str:
    name = str(dtype).lower().replace("torch.", "")
    try:
        return _DTYPE_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_ALIASES)}") from None


def dtype_bytes(dtype) -> int:
    return 4 if canonical_dtype(dtype) == "float32" else 2


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or one CPU rank for `local`)."""
    name: str
    memory_bytes: float                     # M: device memory capacity
    memory_bandwidth: float                 # B_mem: bytes/s
    flops: tuple[tuple[str, float], ...]    # (dtype, dense FLOP/s), e.g. (("bfloat16", 125e12), ...)
    layer_overhead: float = 0.0             # seconds per decoder-layer call beyond its roofline terms
    # (dtype, rows, FLOP/s) of a linear with that many input rows over weights read from memory (measured for
    # `local`: decode's few-row linears run far below the large-matmul rate); empty: the roofline's terms
    decode_flops: tuple[tuple[str, int, float], ...] = ()
    # how much faster a device runs while the others of its node idle than while all of them run (they share
    # a memory bus and caches, as CPU ranks do; 1.0: independent devices, as GPUs are)
    solo_speedup: float = 1.0

    def __post_init__(self):
        if not self.name:
            raise ValueError("DeviceSpec.name must be non-empty")
        for field in ("memory_bytes", "memory_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"DeviceSpec.{field} must be positive, got {getattr(self, field)}")
        if not (self.layer_overhead >= 0 and math.isfinite(self.layer_overhead)):
            raise ValueError(f"DeviceSpec.layer_overhead must be finite and >= 0, got {self.layer_overhead}")
        if not (self.solo_speedup >= 1 and math.isfinite(self.solo_speedup)):
            raise ValueError(f"DeviceSpec.solo_speedup must be finite and >= 1, got {self.solo_speedup}")
        if not self.flops or any(v <= 0 for _, v in self.flops):
            raise ValueError(f"DeviceSpec.flops must list positive FLOP/s per dtype, got {self.flops}")
        object.__setattr__(self, "flops", tuple((canonical_dtype(k), float(v)) for k, v in self.flops))
        if any(rows < 1 or rate <= 0 for _, rows, rate in self.decode_flops):
            raise ValueError(f"DeviceSpec.decode_flops must list (dtype, rows >= 1, FLOP/s > 0), "
                             f"got {self.decode_flops}")
        object.__setattr__(self, "decode_flops", tuple(sorted((canonical_dtype(d), int(r), float(v))
                                                              for d, r, v in self.decode_flops)))

    def flops_for(self, dtype) -> float:
        name = canonical_dtype(dtype)
        for key, value in self.flops:
            if key == name:
                return value
        raise ValueError(f"DeviceSpec.flops of {self.name} has no figure for {name}; "
                         f"known: {[k for k, _ in self.flops]}")

    def decode_flops_for(self, dtype, rows: float) -> float | None:
        """FLOP/s of a `rows`-row linear in `dtype`: the measured figures interpolated in log(rows), the end
        figures beyond them; None without figures for `dtype`."""
        points = [(r, v) for d, r, v in self.decode_flops if d == canonical_dtype(dtype)]
        if not points:
            return None
        rows = max(float(rows), 1.0)
        if rows <= points[0][0]:
            return points[0][1]
        for (r0, v0), (r1, v1) in zip(points, points[1:]):
            if rows <= r1:
                t = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
                return (1 - t) * v0 + t * v1               # exactly v1 at a measured row count (t = 1)
        return points[-1][1]


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """`num_devices` identical devices on one node, or on several nodes of `node_size` devices each.

    All-reduce costs are tabulated per degree 2..len+1 (degree 1 costs nothing): an all-reduce of a buffer of
    `n` bytes at degree `k` takes `allreduce_latency[k-2] + n / allreduce_bandwidth[k-2]` (algorithm
    bandwidth: buffer bytes per second, the ring's 2(k-1)/k traffic factor already folded in). Degrees above
    the table reuse its last entry.

    A shaped link (a token bucket, as tc's tbf between test hosts) sets `link_bucket_seconds`: traffic passes
    at the line figures above while the bucket holds tokens, else at the sustained bandwidths. The bucket
    holds `link_bucket_seconds` of sustained traffic and refills during the `gap` of compute between two
    transfers, so one transfer of n bytes takes max(n / line, n / sustained - min(bucket, gap)).

    Several nodes (`node_size` set): all-reduces of degree <= node_size stay inside a node (their table
    entries are the node's, never shaped); larger degrees and pipeline sends cross the link between nodes.
    """
    name: str
    device: DeviceSpec
    num_devices: int
    allreduce_bandwidth: tuple[float, ...]   # index degree-2
    allreduce_latency: tuple[float, ...]     # index degree-2, seconds per call
    p2p_bandwidth: float                     # one direction between two devices (pipeline sends)
    p2p_latency: float
    host_link_bandwidth: float               # host <-> device, one direction, per device
    host_memory_per_device: float            # host DRAM for the KV tier and the weight master copy
    source: str = "datasheet"
    link_bucket_seconds: float | None = None          # shaped link only (None: the line figures always hold)
    allreduce_sustained_bandwidth: float | None = None  # shaped link: buffer bytes/s of back-to-back all-reduces
    p2p_sustained_bandwidth: float | None = None      # shaped link: bytes/s of back-to-back sends
    node_size: int | None = None                      # devices per node (None: one node)

    def __post_init__(self):
        if self.num_devices < 1:
            raise ValueError(f"ClusterSpec.num_devices must be >= 1, got {self.num_devices}")
        if len(self.allreduce_bandwidth) != len(self.allreduce_latency):
            raise ValueError("ClusterSpec.allreduce_bandwidth and allreduce_latency must have equal length")
        if self.num_devices > 1 and not self.allreduce_bandwidth:
            raise ValueError("ClusterSpec.allreduce_bandwidth is empty but num_devices > 1")
        if any(b <= 0 for b in self.allreduce_bandwidth) or any(t < 0 for t in self.allreduce_latency):
            raise ValueError("ClusterSpec.allreduce_bandwidth must be positive and allreduce_latency >= 0")
        for field in ("p2p_bandwidth", "host_link_bandwidth", "host_memory_per_device"):
            if not getattr(self, field) > 0:
                raise ValueError(f"ClusterSpec.{field} must be positive, got {getattr(self, field)}")
        if self.node_size is not None and self.node_size < 1:
            raise ValueError(f"ClusterSpec.node_size must be >= 1 or None, got {self.node_size}")
        if self.p2p_latency < 0:
            raise ValueError(f"ClusterSpec.p2p_latency must be >= 0, got {self.p2p_latency}")
        shaped = (self.link_bucket_seconds, self.allreduce_sustained_bandwidth, self.p2p_sustained_bandwidth)
        if any(v is not None for v in shaped):
            if any(v is None for v in shaped):
                raise ValueError("ClusterSpec: a shaped link needs link_bucket_seconds and both sustained "
                                 "bandwidths")
            if self.link_bucket_seconds < 0 or min(shaped[1:]) <= 0:
                raise ValueError("ClusterSpec.link_bucket_seconds must be >= 0 and the sustained bandwidths "
                                 "positive")

    @property
    def shaped(self) -> bool:
        return self.link_bucket_seconds is not None

    def _transfer_seconds(self, nbytes: float, line: float, sustained: float | None, gap: float) -> float:
        """One transfer of `nbytes` after `gap` seconds without traffic (token-bucket refill time)."""
        if sustained is None or not self.shaped:
            return nbytes / line
        return max(nbytes / line, nbytes / sustained - min(self.link_bucket_seconds, max(gap, 0.0)))

    def allreduce_seconds(self, nbytes: float, degree: int, calls: float = 1.0, gap: float = 0.0) -> float:
        """`calls` all-reduces moving `nbytes` in total (latency paid per call), each after `gap` seconds of
        compute (matters on a shaped link only; the sustained figure is the degree-2 one at every degree)."""
        if degree <= 1:
            return 0.0
        i = min(degree, len(self.allreduce_bandwidth) + 1) - 2
        inside_node = self.node_size is not None and degree <= self.node_size
        per_call = self._transfer_seconds(nbytes / calls, self.allreduce_bandwidth[i],
                                          None if inside_node else self.allreduce_sustained_bandwidth, gap)
        return calls * (self.allreduce_latency[i] + per_call)

    def p2p_seconds(self, nbytes: float, messages: float = 1.0, transfers: float = 1.0,
                    gap: float = 0.0) -> float:
        """`messages` sends (latency each) carrying `nbytes` in total in `transfers` bulk transfers, each
        after `gap` seconds of compute."""
        per_transfer = self._transfer_seconds(nbytes / transfers, self.p2p_bandwidth, self.p2p_sustained_bandwidth,
                                              gap)
        return messages * self.p2p_latency + transfers * per_transfer

    def with_devices(self, num_devices: int) -> "ClusterSpec":
        return dataclasses.replace(self, num_devices=num_devices)


def ring_allreduce_table(link_bandwidth: float, hop_latency: float, max_degree: int = 64):
    """Bandwidth and latency per degree for a ring on full-duplex links of `link_bandwidth` each way.

    A ring all-reduce sends 2(k-1)/k of the buffer over each link, so the algorithm bandwidth is
    link * k / (2(k-1)). Latency: 2*ceil(log2 k) hops (tree-like small-message protocols), an assumption,
    not a datasheet figure.
    """
    degrees = range(2, max_degree + 1)
    bandwidth = tuple(link_bandwidth * k / (2 * (k - 1)) for k in degrees)
    latency = tuple(2 * math.ceil(math.log2(k)) * hop_latency for k in degrees)
    return bandwidth, latency


def _datasheet_cluster(name, device, link_bw, hop_latency, host_link_bw, host_mem) -> ClusterSpec:
    bandwidth, latency = ring_allreduce_table(link_bw, hop_latency)
    return ClusterSpec(name=name, device=device, num_devices=1, allreduce_bandwidth=bandwidth,
                       allreduce_latency=latency, p2p_bandwidth=link_bw, p2p_latency=hop_latency,
                       host_link_bandwidth=host_link_bw, host_memory_per_device=host_mem)


# PCIe 4.0 x8 per GPU as on the A10/L4 machines of the Seesaw paper (16 GiB/s each way).
_PCIE4_X8 = 16 * GIB
# PCIe 4.0 x16: 32 GB/s each way (datasheets quote 64 GB/s counting both directions).
_PCIE4_X16 = 32 * GB
# PCIe 5.0 x16: 64 GB/s each way (H100 SXM datasheet: 128 GB/s both directions).
_PCIE5_X16 = 64 * GB
_PCIE_HOP = 5e-6     # assumed per-hop small-message latency over PCIe
_NVLINK_HOP = 2e-6   # assumed per-hop small-message latency over NVLink/NVSwitch
_PAPER_HOST_MEM = 80 * GIB  # host memory per GPU on the Seesaw paper's machines
# Assumed, not a datasheet figure: an eager PyTorch decoder layer launches ~12 kernels at ~5 us each.
_EAGER_LAYER = 60e-6

DEVICES = {
    # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s, FP16/BF16 tensor 125 TFLOPS dense (250 sparse), FP32 31.2.
    "A10": DeviceSpec("A10", 24 * GIB, 600 * GB, (("float16", 125 * TFLOPS), ("bfloat16", 125 * TFLOPS),
                                                  ("float32", 31.2 * TFLOPS)), _EAGER_LAYER),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, FP16/BF16 tensor 242 TFLOPS sparse -> 121 dense, FP32 30.3.
    "L4": DeviceSpec("L4", 24 * GIB, 300 * GB, (("float16", 121 * TFLOPS), ("bfloat16", 121 * TFLOPS),
                                                ("float32", 30.3 * TFLOPS)), _EAGER_LAYER),
    # NVIDIA A100 datasheet (40GB PCIe / SXM4): 40 GB HBM2, 1555 GB/s, BF16/FP16 tensor 312 TFLOPS dense, FP32 19.5.
    "A100": DeviceSpec("A100", 40 * GIB, 1555 * GB, (("float16", 312 * TFLOPS), ("bfloat16", 312 * TFLOPS),
                                                     ("float32", 19.5 * TFLOPS)), _EAGER_LAYER),
    # NVIDIA H100 datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16/FP16 tensor 1979 TFLOPS sparse -> 989 dense, FP32 67.
    "H100": DeviceSpec("H100", 80 * GIB, 3350 * GB, (("float16", 989 * TFLOPS), ("bfloat16", 989 * TFLOPS),
                                                     ("float32", 67 * TFLOPS)), _EAGER_LAYER),
}

CLUSTERS = {
    # GPUs talk over PCIe 4.0 x8 through the host, as in the paper's A10 machines.
    "A10": _datasheet_cluster("A10", DEVICES["A10"], _PCIE4_X8, _PCIE_HOP, _PCIE4_X8, _PAPER_HOST_MEM),
    # Same host setup as the paper's L4 machines.
    "L4": _datasheet_cluster("L4", DEVICES["L4"], _PCIE4_X8, _PCIE_HOP, _PCIE4_X8, _PAPER_HOST_MEM),
    # A100 40GB PCIe datasheet: PCIe 4.0 x16 (64 GB/s both directions); no NVLink bridge assumed.
    "A100-PCIE": _datasheet_cluster("A100-PCIE", DEVICES["A100"], _PCIE4_X16, _PCIE_HOP, _PCIE4_X16,
                                    _PAPER_HOST_MEM),
    # A100 SXM4 datasheet: NVLink 600 GB/s both directions -> 300 GB/s each way, via NVSwitch (HGX).
    # Host: DGX A100 datasheet, 1 TB system memory for 8 GPUs -> 128 GB per GPU.
    "A100-NVLINK": _datasheet_cluster("A100-NVLINK", DEVICES["A100"], 300 * GB, _NVLINK_HOP, _PCIE4_X16,
                                      128 * GB),
    # H100 SXM5 datasheet: NVLink 900 GB/s both directions -> 450 GB/s each way; PCIe 5.0 x16 to the host.
    # Host: DGX H100 datasheet, 2 TB system memory for 8 GPUs -> 256 GB per GPU.
    "H100-SXM": _datasheet_cluster("H100-SXM", DEVICES["H100"], 450 * GB, _NVLINK_HOP, _PCIE5_X16, 256 * GB),
}
_ALIASES = {"A100": "A100-NVLINK", "A100-SXM": "A100-NVLINK", "H100": "H100-SXM", "A100PCIE": "A100-PCIE",
            "A100NVLINK": "A100-NVLINK", "H100SXM": "H100-SXM"}

_SPEC_RE = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?([A-Za-z0-9_\-]+)\s*$")


def parse_cluster(spec: str | ClusterSpec, num_devices: int | None = None, *,
                  recalibrate: bool = False) -> ClusterSpec:
    """"8xA10" -> 8 A10s; "local" / "2xlocal" -> this machine (calibrated, cached).

    `num_devices`, when given, overrides the count in the string (a recipe's world size).
    """
    if isinstance(spec, ClusterSpec):
        return spec.with_devices(num_devices) if num_devices else spec
    match = _SPEC_RE.match(str(spec))
    if not match:
        raise ValueError(f"cluster spec {spec!r} is not of the form '<count>x<kind>' (e.g. '8xA10') or 'local'")
    count = num_devices or (int(match.group(1)) if match.group(1) else None)
    kind = match.group(2).upper()
    if kind == "LOCAL":
        from seesaw_ds.planner.calibrate import local_cluster
        return local_cluster(num_ranks=count, recalibrate=recalibrate)
    kind = _ALIASES.get(kind, kind)
    if kind not in CLUSTERS:
        raise ValueError(f"unknown device kind {match.group(2)!r} in cluster spec {spec!r}; "
                         f"known: {', '.join(sorted(CLUSTERS))}, local")
    if count is None:
        raise ValueError(f"cluster spec {spec!r} needs a device count, e.g. '8x{kind}'")
    return CLUSTERS[kind].with_devices(count)
