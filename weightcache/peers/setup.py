"""Starting a daemon's peers: checks, the peer set, the client, the DNS refresh."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from weightcache.aio import Clock
from weightcache.config import Config
from weightcache.errors import ConfigInvalid
from weightcache.node import PeerSetup
from weightcache.peers.members import Members, Resolver, resolve_addresses
from weightcache.peers.transport import PeerClient
from weightcache.scheduler import PrioritySlots

log = logging.getLogger(__name__)


def check_peers(cfg: Config) -> None:
    """A daemon with peers needs the token (peers authenticate with it) and a TCP
    listener (the others ask this node there)."""
    if not cfg.peers.enabled:
        return
    problems = []
    if not cfg.daemon.token:
        problems.append(
            "peers: peers authenticate to each other with the daemon's bearer token, and "
            "none is set: set WEIGHTCACHE_TOKEN (the same on every node) or daemon.token_file"
        )
    if not cfg.daemon.listen:
        problems.append(
            "peers: the other nodes ask this one for chunks over TCP, and daemon.listen is "
            "empty: set WEIGHTCACHE_DAEMON_LISTEN (e.g. 0.0.0.0:7878)"
        )
    if problems:
        raise ConfigInvalid(problems)


def make_setup(cfg: Config, clock: Clock, *, resolver: Resolver = resolve_addresses) -> PeerSetup:
    """The peers of a daemon (blocking: resolves names)."""
    p = cfg.peers
    members = Members(p, listen=cfg.daemon.listen, clock=clock, resolver=resolver)
    members.refresh()
    client = PeerClient(
        token=cfg.daemon.token,
        node_id=members.node_id,
        own_url=own_url(members, cfg),
        connect_timeout_s=p.connect_timeout_s,
        wait_s=p.wait_s,
        timeout_s=p.timeout_s,
        max_connections=max(16, p.concurrency * 2),
    )
    log.info(
        "peers.started peers=%d self=%s source=%s",
        len(members.peers()),
        ",".join(members.self_urls) or "-",
        f"dns:{p.dns}" if p.dns else "urls",
    )
    executor = ThreadPoolExecutor(max_workers=p.concurrency, thread_name_prefix="weightcache-peer")
    return PeerSetup(members, client, PrioritySlots(p.concurrency), executor)


def own_url(members: Members, cfg: Config) -> str:
    """How this node names itself to its peers (their per-peer counters)."""
    selves = members.self_urls
    return selves[0] if selves else f"http://{cfg.daemon.listen}"


async def refresh_forever(setup: PeerSetup, cfg: Config, clock: Clock) -> None:
    """Resolve ``peers.dns`` every ``peers.refresh_s`` (a task of the service)."""
    members: Members = setup.members
    while True:
        await clock.sleep(cfg.peers.refresh_s)
        await asyncio.to_thread(members.refresh)
        setup.client.own_url = own_url(members, cfg)
