#!/usr/bin/env python3
"""Fleet simulation: N nodes cold-start one model at once, pulled naive, per node or via peers.

A flow-level model, no network: every transfer of a chunk is a fluid flow whose
rate is its max-min fair share of the bottlenecks it crosses, recomputed every
step. Strategies, side by side for each fleet size N:

* ``naive``: each of the M workers of a node pulls the whole model from the
  origin itself; the origin sends the model N x M times;
* ``per-node``: one daemon per node pulls the model once; the origin sends it N times;
* ``peers-in-order``, **no longer built** (the daemon's first version, kept
  for comparison): the owner of each chunk,
  ``rendezvous.owner(chunk_key(digest, i), peers)`` (the daemon's own code),
  pulls it from the origin; every other node downloads it from the owner. A
  pull queues all its chunks at once, in manifest order: those it owns wait
  for an origin slot (``fetch.concurrency``), the others for a peer slot
  (``peers.concurrency``), first come first served, so every node asks for the
  same chunks at the same moment. A request to an owner still pulling the
  chunk waits there, holding its slot. The origin sends the model once; a node
  uploads (chunks it owns) x (N - 1);
* ``peers``, as the daemon does it now: as ``peers-in-order``, but each node
  asks in its own order: by when the owner will have the chunk (its place in
  the owner's list // fetch.concurrency), ties in a per-node random order
  (``weightcache.peers.rendezvous.pull_order``);
* ``peers+relay``, **not built**: as ``peers``, and a node that holds a
  chunk serves it too (a swarm): a requester takes whichever of the owner and
  two random holders has the fewest uploads in flight.

Assumptions (every one a flag or a constant below):

* sizes: the model is ``--model-gb`` GiB (2**30 bytes) in 5 GiB shards, each a
  blob (digest) cut into ``--chunk-mib`` MiB chunks: 100 GiB / 64 MiB = 1,600
  chunks. Bandwidths are decimal: 100 Gbit/s = 12.5e9 bytes/s.
* nodes: a ``--nic-gbit`` NIC, full duplex (upload and download are separate
  capacities); the network core is non-blocking, so only the NICs and the
  origin are bottlenecks. Disks, CPUs and memory never limit (an owner re-hashes
  a chunk of a partial blob for every request it serves: not modelled).
* origin: ``--origin-gbs`` GB/s in all; at most ``--origin-rps`` new requests a
  second (S3's 5,500 GET/s per prefix; a token bucket holding one second of
  them, full at the start); ``--origin-stream-gbs`` per request if set (S3
  gives about 0.1 GB/s per connection; the default 0 means no such cap).
* slots: ``--concurrency`` origin requests at once per node (per worker for
  naive), ``--peer-concurrency`` transfers from peers at once per node (the
  daemon's defaults, 8 and 8); one request per chunk; no latency, failures or
  retries; owners serve any number of requests at once, and no timeout fires
  (``peers.wait_s`` and ``timeout_s``: bytes keep flowing, if slowly).
* naive: a node's M workers are identical, so they are simulated as one flow
  bundle of weight M (each of the M transfers gets the same rate).
* a chunk is served only once whole (no cut-through).
* sharing: progressive filling (exact max-min fairness) over every node's
  downlink and uplink and the origin, per step. A step lasts until the next
  flow ends, but at least ``--step`` (0.1) x the median flow's chunk time; a
  flow ending inside a step frees its slot at the step's end, so ready times
  lean pessimistic (``--step 0.02`` made them up to 10% shorter). Byte counts are
  whole chunks, so they are exact.

Measured per strategy and N: origin bytes (x model), p50 and p99 over nodes of
the time a node holds the whole model, per-node upload (max and mean, x
model), and *bound*, a lower bound on the last node's ready time from the same
traffic: max(model / NIC, busiest uplink's bytes / NIC, origin bytes / origin bandwidth).

    .venv/bin/python -m loadtest.fleet_sim                        # about 1 min on 2 cores
    .venv/bin/python -m loadtest.fleet_sim --nodes 4,8 --model-gb 1 --json
    .venv/bin/python -m loadtest.fleet_sim --report   # docs/benchmarks.md, docs/img/fleet_sim.png
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

if not __package__:  # run as a file: import loadtest from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from loadtest.scenario import ROOT, argument_parser, machine, markers, put_section, versions
from weightcache.hashing import digest_bytes
from weightcache.peers.rendezvous import chunk_key, owner

GIB, MIB = 1 << 30, 1 << 20
SHARD_BYTES = 5 * GIB
STRATEGIES = ("naive", "per-node", "peers-in-order", "peers", "peers+relay")
NOT_BUILT = ("peers-in-order", "peers+relay")  # in the daemon (no longer, and not yet)
REPORT = ROOT / "docs" / "benchmarks.md"  # and docs/img/fleet_sim.png
RELAY_DRAWS = 2  # peers+relay: random holders weighed against the owner
ORIGIN = -1  # a flow's source when it is the origin
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Row = dict[str, Any]


@dataclass(frozen=True)
class Fleet:
    model_bytes: int
    chunk_bytes: int
    nic_bps: float
    origin_bps: float
    origin_rps: float  # 0: no cap
    stream_bps: float  # 0: no cap
    workers: int
    concurrency: int
    peer_concurrency: int
    step: float
    seed: int


def chunk_layout(fleet: Fleet) -> tuple[list[str], Ints]:
    """The model's chunk keys and sizes: 5 GiB shards, each a blob cut into chunks."""
    keys, sizes = [], []
    for shard, start in enumerate(range(0, fleet.model_bytes, SHARD_BYTES)):
        length = min(SHARD_BYTES, fleet.model_bytes - start)
        digest = digest_bytes(f"fleet_sim shard {shard}".encode())
        for index, offset in enumerate(range(0, length, fleet.chunk_bytes)):
            keys.append(chunk_key(digest, index))
            sizes.append(min(fleet.chunk_bytes, length - offset))
    return keys, np.array(sizes, dtype=np.int64)


def owners(keys: list[str], nodes: int) -> Ints:
    """Each chunk's owner (a node index) by the daemon's rendezvous code; peers are base URLs
    as ``peers.urls`` lists them (``peers.port`` 7878)."""
    names = [f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7878" for i in range(nodes)]
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[owner(key, names)] for key in keys], dtype=np.int64)


def max_min_rates(a: Ints, b: Ints, flow_cap: Floats, cap: Floats) -> Floats:
    """Max-min fair rates of flows that cross resources ``a`` and ``b`` (indices into ``cap``).

    Progressive filling, batched: a resource whose fair share of what is left is
    no larger than any other limit of its unfixed flows is saturated at that
    share for good (shares only grow as other flows are fixed), so every such
    resource is fixed in the same round; the smallest share always is.
    """
    rate, free, left = np.zeros(len(a)), np.ones(len(a), dtype=bool), cap.copy()
    for round_ in range(64):
        idx = np.flatnonzero(free)
        if idx.size == 0:
            break
        fa, fb, fc = a[idx], b[idx], flow_cap[idx]
        load = np.bincount(fa, minlength=len(cap)) + np.bincount(fb, minlength=len(cap))
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(load > 0, np.maximum(left, 0.0) / load, np.inf)
        link = np.minimum(share[fa], share[fb])
        fm = np.minimum(link, fc)
        low = np.full(len(cap), np.inf)
        np.minimum.at(low, fa, fm)
        np.minimum.at(low, fb, fm)
        neck = share <= low * (1 + 1e-9)
        fix = neck[fa] | neck[fb] | (fc <= link) | (round_ == 63)
        rate[idx[fix]] = fm[fix]
        left -= np.bincount(fa[fix], fm[fix], len(cap)) + np.bincount(fb[fix], fm[fix], len(cap))
        free[idx[fix]] = False
    return rate


def queues(strategy: str, nodes: int, own: Ints, conc: int, rng: np.random.Generator) -> list[Ints]:
    """Per node, the chunks it asks the origin for and (peers) the peers for, in that order:
    nodes x chunks arrays, where -1 pads a row past its node's last chunk."""
    k = len(own)
    if not strategy.startswith("peers"):
        return [np.tile(np.arange(k), (nodes, 1))]
    mine = own[None, :] == np.arange(nodes)[:, None]
    index = np.tile(np.arange(k, dtype=np.float64), (nodes, 1))  # manifest order
    if strategy == "peers-in-order":
        order_key = index
    else:  # by when the owner will have it (it pulls conc at a time), then per node at random
        by_owner = np.argsort(own, kind="stable")
        position = np.empty(k, dtype=np.int64)  # a chunk's place in its owner's pull order
        position[by_owner] = np.arange(k) - np.searchsorted(own[by_owner], own[by_owner])
        order_key = position // conc + rng.random((nodes, k))
    out = []
    for key in (np.where(mine, index, np.inf), np.where(mine, np.inf, order_key)):
        ordered = np.argsort(key, axis=1, kind="stable")
        out.append(np.where(np.take_along_axis(key, ordered, axis=1) < np.inf, ordered, -1))
    return out


def pick_holders(
    wanted: Ints, holders: Ints, held: Ints, uploading: Ints, rng: np.random.Generator
) -> Ints:
    """peers+relay: the source of each wanted chunk, whichever of its owner (first holder) and
    RELAY_DRAWS random holders has the fewest uploads in flight, counting those picked before
    it; ``uploading`` is updated."""
    others = held[wanted, None] - 1
    draw = np.where(
        others > 0, 1 + (rng.random((wanted.size, RELAY_DRAWS)) * others).astype(np.int64), 0
    )
    choices = np.concatenate([holders[wanted, :1], holders[wanted[:, None], draw]], axis=1).tolist()
    busy, chosen = uploading.tolist(), []
    for candidates in choices:
        pick = min(candidates, key=busy.__getitem__)
        busy[pick] += 1
        chosen.append(pick)
    uploading[:] = busy
    return np.array(chosen, dtype=np.int64)


def simulate(strategy: str, nodes: int, fleet: Fleet, sizes: Ints, own: Ints) -> Row:
    """Run one strategy on ``nodes`` nodes until every node holds the model; the measurements."""
    began, rng = time.perf_counter(), np.random.default_rng(fleet.seed)
    k, peered, relay = len(sizes), strategy.startswith("peers"), strategy == "peers+relay"
    bundle = fleet.workers if strategy == "naive" else 1
    # Two pools of slots per node, as in the daemon: origin (fetch.concurrency) and peers
    # (peers.concurrency); slot s is node s // c's. Each pool works through its own queue.
    co, cp = fleet.concurrency, fleet.peer_concurrency if peered else 0
    c = co + cp
    pools = (slice(0, co), slice(co, c))[: 2 if peered else 1]
    lanes = list(zip(queues(strategy, nodes, own, co, rng), pools, strict=True))
    nxt = [np.zeros(nodes, dtype=np.int64) for _ in lanes]  # next place in each queue
    length = [(q >= 0).sum(axis=1) for q, _ in lanes]
    have = np.zeros((nodes, k), dtype=bool)
    holders = np.zeros((k, nodes if relay else 1), dtype=np.int64)  # relay: who holds a chunk
    held = np.zeros(k, dtype=np.int64)
    busy = np.zeros(nodes * c, dtype=bool)
    chunk, src, left = (
        np.zeros(nodes * c, np.int64),
        np.zeros(nodes * c, np.int64),
        np.zeros(nodes * c),
    )
    uploading = np.zeros(nodes, np.int64)  # relay: uploads in flight per node
    done, ready = np.zeros(nodes, np.int64), np.zeros(nodes)
    up_bytes, peer_down = np.zeros(nodes, np.int64), np.zeros(nodes, np.int64)
    origin_bytes, steps, t, tokens = 0, 0, 0.0, fleet.origin_rps
    # Resources: downlinks 0..N-1, uplinks N..2N-1, the origin 2N; a bundle takes `bundle` shares.
    cap = np.array([fleet.nic_bps] * (2 * nodes) + [fleet.origin_bps]) / bundle
    while (done < k).any():
        steps += 1
        # 1. A free slot takes the next chunk of its queue at once; a peer slot then waits
        #    until the source has the chunk (the owner holds the request while it pulls).
        token_blocked = False
        for (queue, pool), pos, end in zip(lanes, nxt, length, strict=True):
            free = ~busy.reshape(nodes, c)[:, pool]
            take = np.minimum(free.sum(axis=1), end - pos)
            from_origin = pool.start == 0
            if from_origin and fleet.origin_rps > 0:  # the token bucket, nodes in random order
                turn = rng.permutation(nodes)
                before = np.empty(nodes)
                before[turn] = np.cumsum(take[turn]) - take[turn]
                allowed = np.floor(np.maximum(tokens / bundle - before, 0.0)).astype(np.int64)
                token_blocked = bool((allowed < take).any())
                take = np.minimum(take, allowed)
                tokens -= float(take.sum() * bundle)
            rank = np.cumsum(free, axis=1) - 1
            r_i, s_i = np.nonzero(free & (rank < take[:, None]))
            if r_i.size == 0:
                continue
            slot, new = r_i * c + pool.start + s_i, queue[r_i, pos[r_i] + rank[r_i, s_i]]
            source = np.full(new.size, ORIGIN) if from_origin else own[new]
            if relay and not from_origin:
                there = held[new] > 0
                source[there] = pick_holders(new[there], holders, held, uploading, rng)
            busy[slot], chunk[slot], src[slot], left[slot] = True, new, source, sizes[new]
            pos += take
        # 2. Rates: a flow crosses its node's downlink and its source's uplink (or the origin).
        flowing = busy & ((src < 0) | have[np.maximum(src, 0), chunk])
        active = np.flatnonzero(flowing)
        # blocked on tokens: wait for a batch of them (10 ms worth, or one bundle's)
        dt_wait = max(bundle / fleet.origin_rps, 0.01) if token_blocked else np.inf
        if active.size == 0:
            if not token_blocked:
                raise RuntimeError(f"{strategy}: stuck at t={t:.3f} s with nothing in flight")
            t, tokens = t + dt_wait, tokens + fleet.origin_rps * dt_wait
            continue
        s = src[active]
        stream = fleet.stream_bps if fleet.stream_bps > 0 else np.inf
        rate = max_min_rates(
            active // c,
            np.where(s >= 0, nodes + s, 2 * nodes),
            np.where(s < 0, stream, np.inf),
            cap,
        )
        finish = left[active] / rate
        dt = max(float(finish.min()), fleet.step * fleet.chunk_bytes / float(np.median(rate)))
        dt = min(dt, dt_wait)
        # 3. Advance; a chunk lands at its exact finishing time, whole.
        left[active] -= rate * dt
        end = left[active] <= 1e-6 * fleet.chunk_bytes
        fin, when = active[end], t + np.minimum(finish[end], dt)
        dst, fc, fs = fin // c, chunk[fin], src[fin]
        busy[fin], have[dst, fc] = False, True
        if relay:  # append the new holders; a chunk can land at several nodes in a step
            by_chunk = np.argsort(fc, kind="stable")
            sc = fc[by_chunk]
            holders[sc, held[sc] + np.arange(sc.size) - np.searchsorted(sc, sc)] = dst[by_chunk]
            held += np.bincount(fc, minlength=k)
        np.add.at(done, dst, 1)
        np.maximum.at(ready, dst, when)
        peer = fs >= 0
        np.add.at(up_bytes, fs[peer], sizes[fc[peer]])
        np.add.at(peer_down, dst[peer], sizes[fc[peer]])
        uploading -= np.bincount(fs[peer], minlength=nodes) if relay else 0
        origin_bytes += int(sizes[fc[~peer]].sum()) * bundle
        t += dt
        # the bucket holds 1 s of requests, or a step's worth when the step is longer
        tokens = min(fleet.origin_rps * max(1.0, dt), tokens + fleet.origin_rps * dt)
    model = int(sizes.sum())
    owned = np.bincount(own, minlength=nodes) if peered else np.zeros(nodes, np.int64)
    owned_bytes = np.bincount(own, sizes, nodes).astype(np.int64) if peered else owned
    return {
        "strategy": strategy,
        "nodes": nodes,
        "workers": bundle,
        "chunks": k,
        "model_bytes": model,
        "origin_bytes": origin_bytes,
        "ready_p50_s": float(np.percentile(ready, 50)),
        "ready_p99_s": float(np.percentile(ready, 99)),
        "ready_max_s": float(ready.max()),
        "bound_s": max(
            max(model, int(up_bytes.max())) / fleet.nic_bps, origin_bytes / fleet.origin_bps
        ),
        "upload_bytes": up_bytes.tolist(),
        "peer_download_bytes": peer_down.tolist(),
        "owned_bytes": owned_bytes.tolist(),
        "owned_chunks_max": int(owned.max()),
        "nodes_owning_none": int((owned == 0).sum()) if peered else nodes,
        "steps": steps,
        "sim_s": time.perf_counter() - began,
    }


def label(strategy: str) -> str:
    if strategy == "peers-in-order":
        return f"{strategy} (first version)"
    return f"{strategy} (not built)" if strategy in NOT_BUILT else strategy


def table(rows: list[Row]) -> list[str]:
    """The results as a Markdown table."""
    lines = [
        "| strategy | nodes | origin sent (x model) | ready p50 | ready p99 | bound | upload max "
        "(x model) | upload mean (x model) | chunks owned: max / nodes owning none |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        m, up = r["model_bytes"], r["upload_bytes"]
        owning = (
            f"{r['owned_chunks_max']} / {r['nodes_owning_none']}"
            if "peers" in r["strategy"]
            else "-"
        )
        lines.append(
            f"| {label(r['strategy'])} | {r['nodes']:,} | {r['origin_bytes'] / m:,.2f} | "
            f"{r['ready_p50_s']:,.1f} s | {r['ready_p99_s']:,.1f} s | {r['bound_s']:,.1f} s | "
            f"{max(up) / m:.2f} | {sum(up) / len(up) / m:.2f} | {owning} |"
        )
    return lines


def notes(rows: list[Row], fleet: Fleet) -> list[str]:
    """What the numbers say about where peers stop scaling."""
    at = {(r["strategy"], r["nodes"]): r for r in rows}
    sizes = sorted({r["nodes"] for r in rows})
    n, mib, nic = sizes[-1], fleet.chunk_bytes // MIB, fleet.nic_bps
    out = []
    if all((s, m) in at for s in ("peers-in-order", "peers") for m in sizes):
        ratios = ", ".join(
            f"{m:,}: {at['peers-in-order', m]['ready_p99_s'] / at['peers', m]['ready_p99_s']:.1f}x"
            for m in sizes
        )
        out.append(
            f"Same order everywhere (*peers-in-order*, the daemon's first version): p99 ready / "
            f"*peers*'s by nodes: {ratios}. Every node asked for the same few chunks at the same "
            "moment, so the owners of those chunks carried the fleet's peer traffic while the "
            "other uplinks idled. The daemon now asks in an order of its own on each node "
            "(*peers*), which costs no origin bytes."
        )
    if ("peers", n) in at:
        r = at["peers", n]
        hot = r["owned_chunks_max"]
        hot_bytes = hot * fleet.chunk_bytes * (n - 1)
        out.append(
            f"Hot owner (*peers*): at {n:,} nodes the model has {r['chunks']:,} chunks; "
            f"{r['nodes_owning_none']:,} nodes own none and the busiest owns {hot}, so it "
            f"uploads {hot} x {n - 1:,} x {mib} MiB = {hot_bytes / GIB:,.0f} GiB, "
            f"{hot_bytes / nic:.1f} s of its uplink, against {r['model_bytes'] / nic:.1f} s to "
            "receive the model: each owned chunk leaves one NIC N - 1 times. Fixes: receivers "
            "serve what they hold (a fan-out tree or a swarm: *peers+relay*), more owners per "
            "chunk (the first few of `rank`), smaller chunks (`--chunk-mib 16`)."
        )
        out.append(
            "Not modelled: an owner whose blob is still partial hashes a chunk again for every "
            "request it serves, streaming it (`weightcache/peers/serve.py`: a descriptor per "
            f"request, no chunk held in memory), up to {hot_bytes / GIB:,.0f} GiB hashed by the "
            "busiest owner above."
        )
    return out


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Origin bytes and p99 ready time against fleet size, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_o, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.suptitle(title, fontsize=11)
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        dash = "--" if strategy in NOT_BUILT else "-"
        style: dict[str, Any] = {"linestyle": dash, "marker": "o", "label": label(strategy)}
        xs = [r["nodes"] for r in mine]
        ax_o.plot(xs, [r["origin_bytes"] / r["model_bytes"] for r in mine], **style)
        ax_t.plot(xs, [r["ready_p99_s"] for r in mine], **style)
    for ax, ylabel in ((ax_o, "origin sent (x model)"), (ax_t, "p99 node ready (s)")):
        ax.set(xscale="log", yscale="log", xlabel="nodes", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(rows: list[Row], fleet: Fleet, cmd: str, wall_s: float) -> str:
    """The docs section, markers included: strategies and assumptions come from the docstring."""
    doc = (__doc__ or "").replace(":mod:", "")  # RST to Markdown: ``code`` renders in both
    strategies = doc.split("fleet size N:\n\n")[1].split("\n\nAssumptions")[0].splitlines()
    assumptions = doc.split("below):\n\n")[1].split("\n\nMeasured")[0].splitlines()
    begin, end = markers("fleet_sim")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        begin,
        "## Fleet simulation (peers at scale)",
        "",
        f"`loadtest/fleet_sim.py`: a flow-level simulation (no network) of N nodes cold-starting a "
        f"{fleet.model_bytes / GIB:g} GiB model at the same moment, five ways:",
        "",
        *strategies,
        "",
        f"* command: `{cmd}` ({wall_s:.0f} s wall), {when}; {machine()}; {versions('numpy')}",
        "* assumptions (the module docstring's):",
        "",
        *assumptions,
        "",
        "*ready*: when a node holds the whole model (p50, p99 over nodes); *bound*: a lower "
        "bound on the last node's ready time from the same traffic: max(model / NIC, busiest "
        "uplink's bytes / NIC, origin bytes / origin bandwidth).",
        "",
        *table(rows),
        "",
        *[f"* {line}" for line in notes(rows, fleet)],
        "",
        "![fleet simulation: origin bytes and p99 ready time against nodes](img/fleet_sim.png)",
        end,
    ]
    return "\n".join(lines)


def fleet_sizes(text: str) -> list[int]:
    nodes = [int(n) for n in text.split(",")]
    if min(nodes) < 1:
        raise ValueError(text)
    return nodes


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser("fleet_sim", __doc__)
    add = p.add_argument
    add("--nodes", type=fleet_sizes, default="10,50,200,1000,2000", help="fleet sizes, a,b,...")
    add("--model-gb", type=float, default=100.0, help="model size in GiB (100)")
    add("--chunk-mib", type=int, default=64, help="chunk size in MiB (64)")
    add("--nic-gbit", type=float, default=100.0, help="per-node NIC in Gbit/s, each way (100)")
    add("--origin-gbs", type=float, default=50.0, help="origin aggregate GB/s (50)")
    add("--origin-rps", type=float, default=5500.0, help="origin new requests a second; 0: no cap")
    add("--origin-stream-gbs", type=float, default=0.0, help="GB/s per origin request; 0: no cap")
    add("--workers", type=int, default=8, help="workers (GPUs) per node, for naive (8)")
    add("--concurrency", type=int, default=8, help="downloads at once per node or naive worker (8)")
    add("--peer-concurrency", type=int, default=8, help="transfers from peers at once per node (8)")
    add("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    add("--step", type=float, default=0.1, help="shortest step, x the median flow's chunk time")
    add("--seed", type=int, default=0)
    add("--json", nargs="?", const="-", metavar="PATH", help="measurements to PATH (bare: stdout)")
    add(
        "--report",
        type=Path,
        nargs="?",
        const=REPORT,
        metavar="PAGE",
        help="default docs/benchmarks.md; the plot goes to img/ beside it",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    strategies = args.strategies.split(",")
    if not set(strategies) <= set(STRATEGIES):
        print(f"fleet_sim: --strategies takes a subset of {','.join(STRATEGIES)}", file=sys.stderr)
        return 2
    fleet = Fleet(
        model_bytes=int(args.model_gb * GIB),
        chunk_bytes=args.chunk_mib * MIB,
        nic_bps=args.nic_gbit * 1e9 / 8,
        origin_bps=args.origin_gbs * 1e9,
        origin_rps=args.origin_rps,
        stream_bps=args.origin_stream_gbs * 1e9,
        workers=args.workers,
        concurrency=args.concurrency,
        peer_concurrency=args.peer_concurrency,
        step=args.step,
        seed=args.seed,
    )
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout carries only the JSON then
    began, rows = time.perf_counter(), []
    keys, sizes = chunk_layout(fleet)
    for n in args.nodes:
        peered = any(s.startswith("peers") for s in strategies)
        own = owners(keys, n) if peered else np.zeros(len(keys), np.int64)
        for strategy in strategies:
            r = simulate(strategy, n, fleet, sizes, own)
            rows.append(r)
            took = f"({r['steps']} steps, {r['sim_s']:.1f} s)"
            print(
                f"{strategy:>12} x {n:>5}: ready p99 {r['ready_p99_s']:10,.1f} s {took}", file=out
            )
    wall_s = time.perf_counter() - began
    print("\n".join(["", *table(rows), "", *notes(rows, fleet)]), file=out)
    if args.json:
        doc = json.dumps({"fleet": asdict(fleet), "rows": rows}, indent=1)
        if args.json == "-":
            print(doc)
        else:
            Path(args.json).write_text(doc + "\n")
    if args.report:
        exe = Path(sys.executable)
        exe = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
        cmd = shlex.join([str(exe), "-m", "loadtest.fleet_sim", *argv])
        png = args.report.parent / "img" / "fleet_sim.png"
        plot(
            rows,
            png,
            f"{fleet.model_bytes / GIB:g} GiB model, {fleet.chunk_bytes // MIB} MiB "
            f"chunks, {args.nic_gbit:g} Gbit/s NICs, origin {args.origin_gbs:g} GB/s",
        )
        put_section(
            args.report, "fleet_sim", section(rows, fleet, cmd, wall_s), heading="# Benchmarks"
        )
        print(f"wrote {args.report} and {png}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
