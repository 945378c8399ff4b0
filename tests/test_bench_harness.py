"""The bench harness's verdicts: a disagreement with the peer is attributed with the case's float64 reference."""
import torch

from bench import harness
from bench.__main__ import _failing_records


def _case(ours, peer, reference):
    def close(x, y):
        return bool(((x.double() - y.double()).abs() <= 1e-3).all())
    return harness.Case("t", "c", "s", "float32", lambda: ours, "peer", lambda: peer, metric="GB/s", work=1.0,
                        check=close, budget_s=0.001, reference=(lambda: reference) if reference is not None else None)


def _run(case):
    (rec,) = harness.run_cases([case], "cpu", {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0}, quick=True)
    return rec


def test_peer_off_the_reference_does_not_fail_the_run():
    exact = torch.randn(8, dtype=torch.float64)
    rec = _run(_case(exact.float(), exact.float() + 0.5, exact))
    assert rec["agrees_with_peer"] is False and rec["peer_off_reference"] is True
    assert rec["peer_vs_reference"] > 0.49 and rec["ours_vs_reference"] < 1e-6
    assert "PEER OFF THE REFERENCE" in harness.format_row(rec)
    assert _failing_records([rec]) == []


def test_ours_off_the_reference_fails_the_run():
    exact = torch.randn(8, dtype=torch.float64)
    rec = _run(_case(exact.float() + 0.5, exact.float(), exact))
    assert rec["agrees_with_peer"] is False and rec["peer_off_reference"] is False
    assert _failing_records([rec]) == [rec]


def test_disagreement_without_a_reference_fails_the_run():
    rec = _run(_case(torch.ones(4), torch.zeros(4), None))
    assert rec["agrees_with_peer"] is False and "peer_off_reference" not in rec
    assert _failing_records([rec]) == [rec]


def test_agreement_runs_no_reference():
    calls = []

    def reference():
        calls.append(1)
        return torch.ones(4)
    case = _case(torch.ones(4), torch.ones(4), None)
    case.reference = reference
    rec = _run(case)
    assert rec["agrees_with_peer"] is True and calls == []
