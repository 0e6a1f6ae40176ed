"""Which checks `leafmail serve` runs at each stage, from the ``[checks]`` table.

Relay control and loop detection always run; the rest as configured. Kept apart from
the daemon so the policy can be read (and tested) as one list per stage.
"""

from __future__ import annotations

from netserver.admit.access import AccessPolicy
from netserver.connlog import ServerLog

from .checks import AsyncCheck, Check, Stage
from .checks.auth import auth_results_check
from .checks.dnsbl import dnsbl_check, dnswl_check
from .checks.limits import header_limit_check
from .checks.loops import loop_check
from .checks.pool import CheckPool, dns_args
from .checks.received import chain_check, chain_pool_check, helo_check, rdns_check
from .checks.relay import relay_check
from .checks.rfc5322 import rfc5322_check, rfc5322_pool_check
from .checks.senders import SenderLogins, sender_login_check
from .checks.spf import spf_check
from .config import ChecksConfig, Config, DnsConfig
from .dns import make_resolver, make_sync_resolver
from .receive import Policy


def check_pool(checks: ChecksConfig, log: ServerLog | None = None) -> CheckPool:
    """The pool of check processes, with [checks]' budget (started by its first job)."""
    return CheckPool(checks.workers, checks.cpu_limit, checks.time_limit, log=log)


def policy_for(config: Config, pool: CheckPool | None = None) -> Policy:
    """The checks leafmail runs, as the ``[checks]`` table turns them on.

    With a check `pool` (the daemon's), every check that parses the message runs in
    it, within its budget; without one (tests, tools) they run here.

    Sender ownership for logged-in users at MAIL, relay control at RCPT and loop
    detection at end of data, always. The origin
    checks (HELO, DNSWL, DNSBL, reverse DNS, SPF) run at MAIL, once a login is known;
    the content checks (RFC 5322, Received chain, DKIM and Authentication-Results) at
    end of data. Trusted clients (relay_networks, authenticated) skip all of them.
    """
    relay = config.relay_policy()
    mail: list[Check] = [
        sender_login_check(SenderLogins(config.auth.senders, config.local_domains))
    ]
    smtp = config.smtp
    end: list[Check] = [
        header_limit_check(smtp.max_header_size, smtp.max_header_fields),
        loop_check,
    ]
    checks = config.checks
    pooled: list[AsyncCheck] = []  # content checks run in the pool, first of those that wait
    if checks.received != "off":
        mail.append(helo_check(checks.received, config.hostname, config.local_domains, relay))
        if pool is None:
            end.append(chain_check(checks.received, config.hostname, relay))
        else:
            pooled.append(chain_pool_check(checks.received, config.hostname, relay, pool))
    if checks.rfc5322 != "off":
        if pool is None:
            end.append(rfc5322_check(checks.rfc5322, relay))
        else:
            pooled.append(rfc5322_pool_check(checks.rfc5322, relay, pool))
    later = _dns_checks(checks, config.dns, config.hostname, relay, pool)
    if pooled:
        later[Stage.END_OF_DATA] = [*pooled, *later.get(Stage.END_OF_DATA, ())]
    return Policy(
        {
            Stage.MAIL: mail,
            Stage.RCPT: _rcpt_checks(config, relay),
            Stage.END_OF_DATA: end,
        },
        later,
        trusted=relay,  # each check that waits is given `relay` and accepts its clients
    )


def _dns_checks(
    checks: ChecksConfig,
    dns_config: DnsConfig,
    hostname: str,
    relay: AccessPolicy,
    pool: CheckPool | None,
) -> dict[Stage, list[AsyncCheck]]:
    """The checks that ask the DNS; no resolver is even built when all are off."""
    timeout = dns_config.timeout
    wanted = (checks.received, checks.dnsbl, checks.spf, checks.dkim)
    if all(mode == "off" for mode in wanted):
        return {}
    resolver = make_resolver(dns_config)
    mail: list[AsyncCheck] = []
    end: list[AsyncCheck] = []
    if checks.dnswl_zones and (checks.dnsbl != "off" or checks.spf != "off"):
        mail.append(dnswl_check(checks.dnswl_zones, resolver, timeout, relay))
    if checks.dnsbl != "off" and checks.dnsbl_zones:
        mail.append(dnsbl_check(checks.dnsbl, checks.dnsbl_zones, resolver, timeout, relay))
    if checks.received != "off":
        mail.append(rdns_check(checks.received, resolver, timeout, relay))
    if checks.spf != "off" or checks.dkim != "off":
        blocking = make_sync_resolver(dns_config)
        dns = dns_args(dns_config.nameservers, dns_config.port, timeout)
        if checks.spf != "off":
            mail.append(spf_check(checks.spf, blocking, timeout, relay, pool, dns))
        authserv_id = checks.authserv_id or hostname
        end.append(
            auth_results_check(authserv_id, checks.dkim, blocking, timeout, relay, pool, dns)
        )
    return {Stage.MAIL: mail, Stage.END_OF_DATA: end}


def _rcpt_checks(config: Config, relay: AccessPolicy) -> list[Check]:
    """Relay control, then (with local delivery) unknown local users refused at RCPT.

    Refusing an unknown user during the dialogue, rather than bouncing later, keeps
    leafmail from sending backscatter to forged senders.
    """
    checks = [relay_check(config.local_domains, relay)]
    if config.local.enabled:
        from .checks.recipients import local_recipient_check

        checks.append(
            local_recipient_check(config.local, config.local_domains, config.routing.route_for)
        )
    return checks
