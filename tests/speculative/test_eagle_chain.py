"""Dense multi-step drafting (every position at once) vs drafting one chain at a time with the head's dense
reference forward over the growing sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model_config import ModelConfig
from jaxinfer.speculative.eagle_chain import acceptance_counts, greedy_chain
from jaxinfer.speculative.eagle_dense import eagle_forward_dense
from jaxinfer.speculative.eagle_head import init_eagle_head
from tests.speculative.test_eagle_head import _perturb

V, D = 97, 32


def _naive_chain(params, cfg, table, tokens, hidden, positions, r, k):
    """Drafts of the chain starting at row ``r``: rerun the dense forward over rows ``0 .. r`` plus the
    drafted rows, appending ``(d_j, f_j)`` at the next position each step."""
    d2t = np.asarray(params["d2t"])
    toks, hid, pos = list(tokens[: r + 1]), list(hidden[: r + 1]), list(positions[: r + 1])
    out = []
    for _ in range(k):
        f, logits, _ = eagle_forward_dense(params, cfg, table, jnp.asarray([toks]),
                                           jnp.asarray(np.stack(hid))[None], jnp.asarray([pos]))
        d = int(d2t[int(jnp.argmax(logits[0, -1]))])
        out.append(d)
        toks.append(d)
        hid.append(np.asarray(f[0, -1]))
        pos.append(pos[-1] + 1)
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_greedy_chain_equals_one_chain_at_a_time(window):
    tc = ModelConfig("llama", V, D, 48, 2, 4, 2, 8, tie_word_embeddings=True, sliding_window=window)
    cfg, params = init_eagle_head(jax.random.PRNGKey(0), tc, draft_vocab=np.arange(0, V, 2))
    params = _perturb(params, jax.random.PRNGKey(1), 0.5)
    t, k = 6, 3
    table = jax.random.normal(jax.random.PRNGKey(2), (V, D))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, t), 0, V)
    hidden = jax.random.normal(jax.random.PRNGKey(4), (1, t, D))
    positions = jnp.arange(1, t + 1, dtype=jnp.int32)[None]
    drafts = np.asarray(greedy_chain(params, cfg, table, tokens, hidden, positions, k))
    assert drafts.shape == (1, t, k)
    for r in range(t):
        assert drafts[0, r].tolist() == _naive_chain(params, cfg, table, np.asarray(tokens[0]), np.asarray(hidden[0]),
                                                     np.asarray(positions[0]), r, k), r


def test_acceptance_counts():
    tokens = jnp.array([[5, 6, 7, 8, 9, 10]])
    drafts = jnp.zeros((1, 6, 3), jnp.int32)
    drafts = drafts.at[0, 0].set(jnp.array([6, 7, 8]))  # all three right
    drafts = drafts.at[0, 1].set(jnp.array([7, 1, 9]))  # first right, then wrong (the third does not count)
    drafts = drafts.at[0, 2].set(jnp.array([1, 9, 10]))  # first wrong
    valid = jnp.array([[True, True, True, False, False, False]])
    assert acceptance_counts(drafts, tokens, valid, 3).tolist() == [[3, 1, 0, 0, 0, 0]]
