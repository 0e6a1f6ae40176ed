"""Routing: which delivery agent takes each recipient (smarthost, MX or local).

`Routing.route_for` names the route of a recipient's domain; `RoutingAgent` splits a
message's open recipients by route and hands each group to its agent, all groups at
once. A `LinkDown` from one agent (the smarthost is unreachable) defers only its own
recipients when the message also had others; when every recipient went that way it is
passed on, so the queue runner still rests the link instead of spinning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..config import QueueConfig, Routing
from ..envelope import Envelope
from ..spool import Spool
from ..states import Route
from . import Agent, Expansions, LinkDown, Result, all_results, domain_of, each_settled


def route_of(routing: Routing, address: str) -> Route:
    domain = domain_of(address)
    if not domain:  # RCPT TO:<postmaster> and other bare names are ours (RFC 5321 4.1.1.3)
        return Route.LOCAL if routing.local_enabled else routing.route_for(routing.hostname)
    return routing.route_for(domain)


class RoutingAgent:
    """Dispatch recipients to the agent of their route."""

    def __init__(
        self,
        routing: Routing,
        agents: Mapping[Route, Agent],
        *,
        waiting: frozenset[Route] = frozenset(),
    ) -> None:
        self.routing = routing
        self.agents = dict(agents)
        self.waiting = waiting  # routes held back (offline) until `leafmail flush`

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,
    ) -> dict[int, Result]:
        groups: dict[Route, list[int]] = {}
        for index in rcpts:
            route = route_of(self.routing, envelope.recipients[index].address)
            groups.setdefault(route, []).append(index)
        if len(groups) == 1:  # the common case needs no task per route
            ((route, indexes),) = groups.items()
            return await self._one_route(route, envelope, data, indexes, expansions, alone=True)
        parts = [
            self._one_route(route, envelope, data, idx, expansions, alone=False)
            for route, idx in groups.items()
        ]
        return await each_settled(parts, expansions)

    async def _one_route(
        self,
        route: Route,
        envelope: Envelope,
        data: bytes,
        rcpts: list[int],
        expansions: Expansions | None,
        *,
        alone: bool,
    ) -> dict[int, Result]:
        agent = self.agents.get(route)
        if agent is None and route in self.waiting:
            text = f"offline: {route} delivery waits for `leafmail flush`"
            return all_results(rcpts, Result.deferred("4.4.1", text))
        if agent is None:
            text = f"no {route} delivery is configured for these recipients"
            return all_results(rcpts, Result.deferred("4.3.5", text))
        try:
            return await agent.deliver(envelope, data, rcpts, expansions)
        except LinkDown as exc:
            if alone:
                raise
            return all_results(rcpts, Result.deferred("4.4.1", str(exc)))

    async def close(self) -> None:
        for agent in self.agents.values():
            await agent.close()


def build_agent(
    config: QueueConfig,
    spool: Spool,
    *,
    notify: Callable[[str], None] | None = None,
    routes: frozenset[Route] | None = None,
    local: Agent | None = None,
) -> Agent | None:
    """The agent for these sections, or None when there is nowhere to deliver.

    Agents are made only for routes in use, so a smarthost-only set-up never loads the
    MX or local machinery. ValueError for settings that cannot work. `local` replaces
    the local agent (the unprivileged queue manager asks a root-side service).
    """
    used = config.routing.in_use
    waiting = frozenset() if routes is None else frozenset(used - routes)
    if routes is not None:
        used &= routes
    agents: dict[Route, Agent] = {}
    if Route.SMARTHOST in used and config.delivery.smarthost:
        from .smarthost import SmarthostAgent, SmarthostSettings

        settings = SmarthostSettings.from_config(config.delivery, config.hostname)
        agents[Route.SMARTHOST] = SmarthostAgent(settings)
    if Route.MX in used:
        from .mx import MxAgent

        agents[Route.MX] = MxAgent(config.mx, config.delivery, dns=config.dns, helo=config.hostname)
    if Route.LOCAL in used and config.local.enabled and local is not None:
        agents[Route.LOCAL] = local
    elif Route.LOCAL in used and config.local.enabled:
        from .local import LocalAgent

        # Aliases to other domains are spooled anew; `notify` hands them to the runner.
        local_domains = config.routing.local_domains
        agents[Route.LOCAL] = LocalAgent(config.local, local_domains, spool, notify=notify)
    if not agents:
        return None
    return RoutingAgent(config.routing, agents, waiting=waiting)
