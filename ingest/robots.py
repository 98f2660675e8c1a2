"""robots.txt: read once per site per crawl run, before any image of that site is requested.

Parsing is Protego's (Scrapy's parser): it implements RFC 9309's `*` and `$` wildcards and
longest-match precedence, which the standard library's urllib.robotparser does not. What we add is
the fetch and its outcome, which no parser decides (RFC 9309 section 2.3.1):
- 2xx: the rules (the first 500 KiB), whatever the Content-Type (an HTML soft-404 page holds none);
- 4xx: no rules (the site has no robots.txt);
- 5xx, 429, timeouts and network errors after our retries: the site is unreachable, so nothing of
  it is fetched in this unit;
- a site our address guard refuses: its images are refused for that reason, not for robots.
The fetch goes through the same session, retries, per-host limits and address guard as images.
The rules are kept for the run's other units in a folder of the crawl output (RobotsStore): a crawl
is thousands of small units, each touching the same big image hosts, and a per-unit cache asked
those hosts for robots.txt once per unit.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from protego import Protego

from maskless.core import storage
from maskless.ingest.validator import Rejected

log = logging.getLogger(__name__)

MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309: parse at least 500 KiB
MAX_AGE_S = 24 * 3600  # RFC 9309: a crawler SHOULD NOT use a cached robots.txt for longer


@dataclass(frozen=True)
class SiteRules:
    """What one site's robots.txt says to us; `refusal` is the reject reason for any URL when set.

    `text` is the robots.txt read (None: the site has none)."""
    parser: Optional[Protego] = None
    refusal: Optional[str] = None
    text: Optional[str] = None

    @classmethod
    def from_text(cls, text: Optional[str]) -> "SiteRules":
        return cls() if text is None else cls(parser=Protego.parse(text), text=text)

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
    return SiteRules.from_text(body[:MAX_ROBOTS_BYTES].decode("utf-8", "replace"))


class RobotsStore:
    """Rules fetched by any unit of a crawl, one JSON file per site under `root`, for MAX_AGE_S.

    Only answers the site gave are kept (rules, or none); a site that was unreachable is asked
    again by the next unit. Units that start on a new site at the same moment may each fetch it
    once: the store saves requests, it does not lock."""

    def __init__(self, root: str, max_age_s: float = MAX_AGE_S):
        self.root, self.max_age_s = root, max_age_s

    def _path(self, site: str) -> str:
        return storage.join(self.root, hashlib.sha1(site.encode()).hexdigest()[:20] + ".json")

    def load(self, site: str) -> Optional[SiteRules]:
        """The stored rules of `site`, or None when absent, too old or unreadable (then fetched again)."""
        path = self._path(site)
        try:
            entry = storage.read_json(path)
            fresh = time.time() - float(entry["fetched_at"]) < self.max_age_s
            if entry["site"] != site or not fresh:
                return None
            return SiteRules.from_text(entry["text"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("robots.txt store entry %s is unreadable (%r): fetching the site's robots.txt again", path, e)
            return None

    def save(self, site: str, rules: SiteRules) -> None:
        if rules.refusal is not None:
            return
        try:
            storage.write_json_atomic(self._path(site), {"site": site, "fetched_at": time.time(), "text": rules.text})
        except OSError as e:  # the unit has its rules; only later units lose the saved request
            log.warning("could not store %s's robots.txt under %s: %r", site, self.root, e)


class RobotsCache:
    """Each site's rules for one unit, fetched (or loaded from the run's store) by the first thread
    that needs them while the others wait."""

    def __init__(self, get: Callable[[str], bytes], store: Optional[RobotsStore] = None):
        self._get, self._store = get, store
        self._lock = threading.Lock()
        self._sites: dict[str, tuple[threading.Lock, list]] = {}

    def rules(self, url: str) -> SiteRules:
        site = site_of(url)
        with self._lock:
            lock, slot = self._sites.setdefault(site, (threading.Lock(), []))
        with lock:
            if not slot:
                rules = self._store.load(site) if self._store else None
                if rules is None:
                    rules = rules_from_fetch(self._get, site)
                    if self._store:
                        self._store.save(site, rules)
                slot.append(rules)
            return slot[0]
