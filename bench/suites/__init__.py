"""Benchmark suites: each module has cases(device, quick) -> list[bench.harness.Case]."""
SUITES = ("nms", "detect", "attention", "ssm", "ssm_conv", "rnn", "rnn_ln", "roi", "fpn", "spp")
