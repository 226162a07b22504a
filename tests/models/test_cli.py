"""``models.cli.exit_status``: how every ``python -m models.<tool>`` ends (status and message)."""

from __future__ import annotations

import pytest

from models.cli import exit_status
from models.distributed import PeerLostError


def _raise(exc: BaseException):
    def run():
        raise exc

    return run


def test_success_is_status_0(capsys):
    assert exit_status(lambda: {"psnr": 30.0}) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [ValueError("bad --lr"), TypeError("bad type"),
                                 FileNotFoundError("no such checkpoint")])  # fmt: skip
def test_user_errors_are_one_line_and_status_2(capsys, exc):
    assert exit_status(_raise(exc)) == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_listed_failures_are_status_1_others_keep_their_traceback(capsys):
    failures = (FloatingPointError, PeerLostError)
    assert exit_status(_raise(FloatingPointError("loss became nan")), failures) == 1
    assert capsys.readouterr().err == "error: loss became nan\n"
    assert exit_status(_raise(PeerLostError("rank 1 died")), failures) == 1
    # Not listed: a bug, so it propagates (with its traceback) instead of becoming a status.
    with pytest.raises(FloatingPointError):
        exit_status(_raise(FloatingPointError("x")))
    with pytest.raises(RuntimeError):
        exit_status(_raise(RuntimeError("internal")), failures)
