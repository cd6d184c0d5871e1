"""The offline verifier's check of the sealed state that format 2 checkpoints carry
(kms/services/state_verify.py): it never goes back, and one change has one digest."""

from __future__ import annotations

from kms.services.state_verify import state_history_errors


def _cp(seq: int, n: int, digest: str) -> dict[str, object]:
    return {"seq": seq, "state_seq": n, "state_sha256": digest * 64}


def test_a_state_that_only_moves_forward_passes() -> None:
    signed = [_cp(10, 1, "a"), _cp(20, 1, "a"), _cp(30, 4, "b"), {"seq": 5}]
    assert state_history_errors(signed) == []


def test_a_state_that_goes_back_or_is_replaced_fails() -> None:
    back = state_history_errors([_cp(10, 5, "a"), _cp(20, 4, "b")])
    assert len(back) == 1 and "went back" in back[0]
    replaced = state_history_errors([_cp(20, 3, "b"), _cp(10, 3, "a")])
    assert len(replaced) == 1 and "checkpoint at seq 20" in replaced[0]
    assert "was replaced" in replaced[0]
