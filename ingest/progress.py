"""What a user of a long crawl sees while it runs: images, not only units.

The driver learns a unit's final counts when it finishes (its stats record) and, while it runs, the
live counts its crawl worker reports (crawl.CrawlWorker.progress, asked about once a second). The
bar shows images settled (accepted, rejected, or its window otherwise closed) out of the images
planned (a URL list slice's rows, estimated beyond a text list's head; a search's result window), so
its rate is images/s and its ETA is in images; the postfix shows units done, accepted,
failed and the failure counts by reason. On a terminal it is a tqdm bar; elsewhere (a Ray job's log)
one line every LINE_INTERVAL_S seconds on stderr; with `progress: false` nothing at all.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Optional, TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 30.0
SHOWN_REASONS = 4  # most frequent failure reasons in the bar's postfix (the summary has them all)


def live_counts(counts: Counter, rejected: Counter, count: int) -> dict:
    """A running unit's counts as the bar reads them: accepted (up to its window `count`; 0: a list
    slice, which keeps every row), rejected by reason, and settled (accepted, duplicate or rejected)."""
    accepted = counts.get("accepted", 0)
    settled = accepted + counts.get("duplicates", 0) + sum(rejected.values())
    return {"accepted": min(count, accepted) if count else accepted, "rejected": dict(rejected), "settled": settled}


class CrawlProgress:
    """The crawl's running totals: finished units' records plus running units' live counts."""

    def __init__(self, planned: dict[str, int], enabled: bool = True, out: Optional[TextIO] = None):
        self.planned = dict(planned)  # unit name -> images it may yield (a list slice's rows may be estimated)
        self.done: dict[str, dict] = {}        # unit name -> counts when it ended
        self.running: dict[str, dict] = {}     # unit name -> latest live counts
        self.started = time.monotonic()
        self.enabled, self.out = enabled, out or sys.stderr
        self.bar = None
        self._last_line = self.started
        if enabled and self.out.isatty():
            self.bar = tqdm(total=sum(self.planned.values()), desc="crawl", unit="img", file=self.out)

    def unit_ended(self, name: str, record: Optional[dict]) -> None:
        """A unit finished (its record) or failed (None): its whole window counts as settled."""
        self.running.pop(name, None)
        counted = record is not None and not record.get("resumed")  # a resumed unit was counted by its own run
        self.done[name] = {"accepted": record.get("accepted", 0) if counted else 0,
                           "rejected": dict(record.get("rejected", {})) if counted else {},
                           "settled": self.planned.get(name, 0), "failed_unit": record is None}
        self.show()

    def unit_live(self, name: str, counts: dict) -> None:
        if name not in self.done:  # a late answer about a unit that has ended is ignored
            self.running[name] = {**counts, "settled": min(counts["settled"], self.planned.get(name, 0))}

    def snapshot(self) -> dict:
        """Totals now: units done/failed of planned, images settled of planned, accepted, failed by reason."""
        rejected: Counter = Counter()
        accepted = settled = 0
        for c in list(self.done.values()) + list(self.running.values()):
            accepted += c["accepted"]
            settled += c["settled"]
            rejected.update(c["rejected"])
        return {"units": len(self.planned), "units_done": len(self.done),
                "units_failed": sum(1 for c in self.done.values() if c["failed_unit"]),
                "images": sum(self.planned.values()), "settled": settled, "accepted": accepted,
                "failed": sum(rejected.values()), "rejected": dict(rejected.most_common()),
                "seconds": time.monotonic() - self.started}

    def show(self, final: bool = False) -> None:
        """Refresh the bar, or print a line when one is due (always at the end)."""
        if not self.enabled:
            return
        s = self.snapshot()
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["rejected"].items())[:SHOWN_REASONS])
        if self.bar is not None:
            self.bar.update(s["settled"] - self.bar.n)  # through update(), so tqdm's rate and ETA follow
            self.bar.set_postfix_str(f"units {s['units_done']}/{s['units']}, accepted {s['accepted']}, "
                                     f"failed {s['failed']}" + (f" ({reasons})" if reasons else ""))
            return
        now = time.monotonic()
        if not final and now - self._last_line < LINE_INTERVAL_S:
            return
        self._last_line = now
        rate = s["settled"] / s["seconds"] if s["seconds"] > 0 else 0.0
        eta = f", ETA {(s['images'] - s['settled']) / rate:.0f} s" if rate > 0 and not final else ""
        print(f"crawl: {s['settled']}/{s['images']} images, {s['units_done']}/{s['units']} units, "
              f"accepted {s['accepted']}, failed {s['failed']}" + (f" ({reasons})" if reasons else "")
              + f", {rate:.1f} images/s{eta}", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.show()
            self.bar.close()
        else:
            self.show(final=True)
