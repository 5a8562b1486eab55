"""``--metrics-port`` serves the CONTRACT §6 metrics in Prometheus text format."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simclr_embed.client import EmbeddingClient, EmbeddingError
from tests.server.conftest import ServerThread, photo

CONTRACT_NAMES = {
    "simclr_requests": "counter",  # exposed as simclr_requests_total{code,protocol}
    "simclr_images": "counter",
    "simclr_batch_size": "histogram",
    "simclr_queue_seconds": "histogram",
    "simclr_inference_seconds": "histogram",
    "simclr_decode_seconds": "histogram",
    "simclr_queue_images": "gauge",
}


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT_NAMES.items():
        assert name in families and families[name].type == kind, name
    samples = {}
    for family in families.values():
        for s in family.samples:
            key = s.name + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                if s.labels
                else ""
            )
            samples[key] = s.value
    return samples


def test_metrics_endpoint_counts_requests_images_and_batches(server: ServerThread) -> None:
    assert server.server.metrics_port
    before = scrape(server.server.metrics_port)
    with EmbeddingClient(server.target) as client:
        client.embed([np.asarray(photo(32, 32, seed=i)) for i in range(5)])
        with pytest.raises(EmbeddingError):
            client.embed([b"not an image"])
    after = scrape(server.server.metrics_port)

    def delta(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta("simclr_requests_total{code=OK,protocol=grpc}") == 1
    assert delta("simclr_requests_total{code=INVALID_ARGUMENT,protocol=grpc}") == 1
    assert delta("simclr_images_total") == 5
    assert delta("simclr_decode_seconds_count") == 6  # the bad image was decoded (and refused) too
    assert delta("simclr_batch_size_sum") == 5
    assert delta("simclr_inference_seconds_count") == delta("simclr_batch_size_count") >= 1
    assert delta("simclr_queue_seconds_count") >= 1
    assert after["simclr_queue_images"] == 0
