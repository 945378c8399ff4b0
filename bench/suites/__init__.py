"""Benchmark suites: each module has cases(device, quick) -> list[bench.harness.Case]."""
SUITES = ("nms", "attention", "ssm", "ssm_conv", "rnn", "rnn_ln", "spp")
