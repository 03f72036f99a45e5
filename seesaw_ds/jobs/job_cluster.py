"""The cluster a job's planner costs layouts on: this machine's calibration and, for a job over several nodes,
the link between them, probed at start-up as the engine would use it.

    nodes = job_nodes(world, comm)             # every rank: nodes x ranks per node, ranks on this machine
    link = probe_link(nodes, comm, say)        # every rank; rank 0 gets the fitted link (None on one node)
    spec = job_cluster(nodes, link)            # rank 0: the ClusterSpec for planner.plan (calibrates once)

One node: the machine's calibration for the job's ranks, as `launch/plan.py --cluster local`. Several nodes:
the machine's calibration for the ranks it runs (namespaced test hosts share one machine's cores; a real
node runs its own), with all-reduces across nodes and the pipeline's sends at the probed link's figures
(`link_fit.nodes_on_link`). The probe is rank 0 against the first rank of node 1 (DeepSpeed's launcher numbers
ranks node by node), a few seconds, announced; it runs only when the planner chooses the layouts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from seesaw_ds.planner.clusters import ClusterSpec
from seesaw_ds.planner.link_fit import TransferFit

PROBE_MIN_BYTES, PROBE_MAX_BYTES = 256, 4 * 2 ** 20     # a decode step's all-reduce .. a prefill micro-batch
PROBE_IDLE_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class JobNodes:
    world_size: int
    ranks_per_node: int
    machine_ranks: int         # ranks on this rank's machine (every rank, for namespaced hosts of one machine)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node


@dataclasses.dataclass(frozen=True)
class FittedLink:
    allreduce: TransferFit
    p2p: TransferFit
    shaped: bool
    seconds: float             # the probe's duration

    def describe(self) -> str:
        def one(fit: TransferFit) -> str:
            rate = fit.sustained_bandwidth or fit.line_bandwidth
            return f"{rate / 1e6:,.1f} MB/s + {fit.latency * 1e3:.2f} ms"
        shaped = f", rate-limited (bucket {1e3 * self.allreduce.bucket_seconds:.0f} ms)" if self.shaped else ""
        return f"all-reduce {one(self.allreduce)}, send {one(self.p2p)}{shaped}"


def job_nodes(world, comm) -> JobNodes:
    """The job's node layout; every rank calls it (machines are told apart by boot id)."""
    from seesaw_ds.distributed.node import boot_id
    if world.size % world.local_size:
        raise RuntimeError(f"{world.size} ranks do not split into nodes of {world.local_size} (LOCAL_SIZE)")
    machines = comm.all_gather_object(boot_id() or f"rank{world.rank}")
    return JobNodes(world.size, world.local_size, sum(m == machines[world.rank] for m in machines))


def probe_link(nodes: JobNodes, comm, say: Callable[[str], None]) -> FittedLink | None:
    """Rank 0 and node 1's first rank time the link (`planner/link_probe.py`); the fit on rank 0, None
    elsewhere and on one node. Every rank calls it."""
    if nodes.num_nodes < 2:
        return None
    import torch.distributed as dist
    from seesaw_ds.planner.link_fit import fit_link
    from seesaw_ds.planner.link_probe import probe, probe_sizes
    pair = [0, nodes.ranks_per_node]
    say(f"probing the link between nodes 0 and 1 (ranks {pair[0]} and {pair[1]}) for the layout planner")
    group = dist.new_group(pair, backend="gloo")        # NOTE: every rank creates it; CPU tensors cross it
    started, measured = time.perf_counter(), None
    if comm.rank in pair:
        measured = probe(pair.index(comm.rank), probe_sizes(PROBE_MIN_BYTES, PROBE_MAX_BYTES), PROBE_IDLE_SECONDS,
                         group=group, peer=pair[1 - pair.index(comm.rank)])
    comm.barrier()
    dist.destroy_process_group(group)
    if comm.rank != 0:
        return None
    link = FittedLink(*fit_link(measured), time.perf_counter() - started)
    say(f"link between nodes ({link.seconds:.1f} s): {link.describe()}")
    return link


def job_cluster(nodes: JobNodes, link: FittedLink | None) -> ClusterSpec:
    """This machine (calibrated for the ranks it runs, cached) as the job's devices, over the link."""
    from seesaw_ds.planner.calibrate import local_cluster
    from seesaw_ds.planner.link_fit import nodes_on_link
    base = local_cluster(nodes.machine_ranks).with_devices(nodes.world_size)
    if link is None:
        return base
    rate = link.allreduce.sustained_bandwidth or link.allreduce.line_bandwidth
    name = f"local ({nodes.num_nodes} nodes of {nodes.ranks_per_node}, link {rate / 1e6:,.0f} MB/s)"
    return nodes_on_link(base, link.allreduce, link.p2p, nodes.ranks_per_node, name=name)
