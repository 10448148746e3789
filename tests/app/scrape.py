"""Reading `/metrics` the way Prometheus does: over HTTP, parsed by prometheus_client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.transport.endpoint import Endpoint

#: A sample's name and its labels, sorted: what one series of a scrape is known by.
Series = tuple[str, tuple[tuple[str, str], ...]]


def scrape(where: Endpoint) -> dict[Series, float]:
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def counters(samples: dict[Series, float]) -> dict[Series, float]:
    """Every `_total` series: what must never go down between two scrapes."""
    return {k: v for k, v in samples.items() if k[0].endswith("_total")}
