"""Sequence state and the no-jax rule for host modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sequence import Sequence, SequenceStatus

ROOT = Path(__file__).resolve().parents[2]


def test_host_modules_do_not_import_jax():
    code = (
        "import sys\n"
        "def heavy():\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy'))\n"
        "import jaxinfer.sequence, jaxinfer.block_manager, jaxinfer.scheduler\n"
        "assert not heavy(), heavy()  # pure Python\n"
        "import jaxinfer.step_inputs, jaxinfer.detokenizer\n"
        "assert not [m for m in heavy() if not m.startswith('numpy')], heavy()  # numpy only\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_sequence_tokens_and_states():
    seq = Sequence("a", [5, 6, 7])
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    assert seq.all_token_ids == [5, 6, 7] and seq.num_uncomputed_tokens == 3
    seq.append_token(8)
    seq.append_token(9)
    assert seq.output_token_ids == [8, 9] and seq.all_token_ids == [5, 6, 7, 8, 9]
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens, seq.last_token_id) == (5, 3, 2, 9)
    seq.num_computed_tokens = 4
    seq.truncate_tokens(4)
    assert seq.all_token_ids == [5, 6, 7, 8] and seq.output_token_ids == [8]
    with pytest.raises(ValueError):
        seq.truncate_tokens(2)  # below the prompt
    seq.set_finished("length")
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.is_finished and seq.finish_reason == "length"
    with pytest.raises(ValueError):
        seq.set_finished("done")


def test_truncate_tokens_requires_kv_truncated_first():
    seq = Sequence("a", [1, 2])
    for t in (3, 4, 5):
        seq.append_token(t)
    seq.num_computed_tokens = 5
    with pytest.raises(ValueError, match="KV first"):
        seq.truncate_tokens(3)


@pytest.mark.parametrize(
    "args",
    [("", [1]), ("a", []), ("a", "abc"), ("a", [1, -1]), ("a", [1.5]), ("a", [True])],
)
def test_bad_sequences_raise_typed_errors(args):
    with pytest.raises(InvalidRequestError):
        Sequence(*args)
