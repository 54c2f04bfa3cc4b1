"""The backbones' throughput bench measures something for a backbone, quickly."""

from __future__ import annotations

from covid_tune.bench.backbones import backbone_throughput


def test_throughput_is_images_per_second_of_both_phases():
    speeds = backbone_throughput("mobilenet_v3_large", size=32, batch=2, threads=1, iterations=1)
    assert set(speeds) == {"train", "infer"}
    assert all(0 < v < float("inf") for v in speeds.values())
