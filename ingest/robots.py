"""robots.txt: read once per site per crawl task, before any image of that site is requested.

Parsing is Protego's (Scrapy's parser): it implements RFC 9309's `*` and `$` wildcards and
longest-match precedence, which the standard library's urllib.robotparser does not. What we add is
the fetch and its outcome, which no parser decides (RFC 9309 section 2.3.1):
- 2xx: the rules (the first 500 KiB), whatever the Content-Type (an HTML soft-404 page holds none);
- 4xx: no rules (the site has no robots.txt);
- 5xx, 429, timeouts and network errors after our retries: the site is unreachable, so nothing of
  it is fetched in this task;
- a site our address guard refuses: its images are refused for that reason, not for robots.
The fetch goes through the same session, retries, per-host limits and address guard as images.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from protego import Protego

from ingest.validator import Rejected

MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309: parse at least 500 KiB


@dataclass(frozen=True)
class SiteRules:
    """What one site's robots.txt says to us; `refusal` is the reject reason for any URL when set."""
    parser: Optional[Protego] = None
    refusal: Optional[str] = None

    def check(self, url: str, agent: str) -> Optional[str]:
        """None when `agent` may fetch `url`, else the reject reason."""
        if self.refusal:
            return self.refusal
        if self.parser is not None and not self.parser.can_fetch(url, agent):
            return "robots"
        return None

    def delay(self, agent: str) -> float:
        """Seconds between request starts the site asks for (Crawl-delay or Request-rate), 0 if none."""
        if self.parser is None:
            return 0.0
        delay = self.parser.crawl_delay(agent) or 0.0
        rate = self.parser.request_rate(agent)
        if rate and rate.requests:
            delay = max(delay, rate.seconds / rate.requests)
        return float(delay)


def site_of(url: str) -> str:
    """scheme://host[:port], the scope of one robots.txt."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def rules_from_fetch(get: Callable[[str], bytes], site: str) -> SiteRules:
    """Fetch SITE/robots.txt with `get` (our image fetch: raises Rejected) and read the outcome."""
    try:
        body = get(site + "/robots.txt")
    except Rejected as e:
        if e.reason == "refused_private":
            return SiteRules(refusal="refused_private")
        unavailable = e.reason.startswith("http_4") and e.reason != "http_429"
        # past 5 redirects RFC 9309 lets us call it unavailable; a malformed URL is left for the
        # image fetch to reject under its own name
        if unavailable or e.reason in ("too_many_redirects", "bad_url"):
            return SiteRules()
        return SiteRules(refusal="robots_unreachable")
    return SiteRules(parser=Protego.parse(body[:MAX_ROBOTS_BYTES].decode("utf-8", "replace")))


class RobotsCache:
    """Each site's rules, fetched by the first thread that needs them while the others wait."""

    def __init__(self, get: Callable[[str], bytes]):
        self._get = get
        self._lock = threading.Lock()
        self._sites: dict[str, tuple[threading.Lock, list]] = {}

    def rules(self, url: str) -> SiteRules:
        site = site_of(url)
        with self._lock:
            lock, slot = self._sites.setdefault(site, (threading.Lock(), []))
        with lock:
            if not slot:
                slot.append(rules_from_fetch(self._get, site))
            return slot[0]
