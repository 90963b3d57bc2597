"""``jaxinfer train-draft`` end to end on a tiny random Llama: data, training (loss goes down), orbax resume
(the resumed run reproduces the uninterrupted one), held-out acceptance, curves, the head file. Plus the
prompt set and draft-vocabulary helpers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.cli import main
from jaxinfer.speculative.eagle_head import load_eagle_head, read_eagle_metadata
from jaxinfer.train import data, everyday, prompts


def _args(model, out, steps, *extra):
    return ["train-draft", "--model", str(model), "--out", str(out), "--num-prompts", "8", "--held-out-prompts", "3",
            "--max-tokens", "12", "--draft-vocab", "48", "--steps", str(steps), "--batch-size", "8", "--warmup", "1",
            "--lr", "3e-3", "--eval-every", "3", "--checkpoint-every", "3", "--dtype", "float32",
            "--max-num-seqs", "16", *extra]


def test_train_draft_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    model, _ = tiny_model_dir("llama")
    out = tmp_path / "run"
    assert main(_args(model, out, 6)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hist = json.loads((out / "history.json").read_text())
    loss = hist["loss"]
    assert len(loss) == 6 and loss[-1] < 0.9 * loss[0], loss  # one fixed batch (all 8 replies): must go down
    assert [e["step"] for e in hist["eval"]] == [3, 6]
    assert (out / "curves.png").stat().st_size > 0

    cfg, params = load_eagle_head(out / "eagle-head.safetensors")
    _, meta = read_eagle_metadata(out / "eagle-head.safetensors")
    assert cfg.draft_vocab_size == 48 and params["lm_head"]["kernel"].shape == (64, 48)
    assert meta["command"].startswith("jaxinfer train-draft") and "--steps 6" in meta["command"]
    assert meta["data"]["train_replies"] == 8 and meta["steps_run"] == 6
    acc = meta["held_out_acceptance"]
    assert acc == result["held_out_acceptance"] and acc["k"] == 4 and acc["positions"] > 0
    assert sum(acc["histogram"]) == acc["positions"] and 1.0 <= acc["mean_length"] <= 5.0

    # without --resume an existing run is refused
    assert main(_args(model, out, 6)) == 2
    # drop the last checkpoint, resume from step 3: the same batches and updates give the same losses
    shutil.rmtree(out / "ckpt" / "6")
    assert main(_args(model, out, 6, "--resume")) == 0
    hist2 = json.loads((out / "history.json").read_text())
    np.testing.assert_allclose(hist2["loss"], loss, rtol=1e-4)
    _, meta2 = read_eagle_metadata(out / "eagle-head.safetensors")
    assert meta2["steps_run"] == 3
    assert meta2["held_out_acceptance"]["mean_length"] == pytest.approx(acc["mean_length"], abs=0.05)

    # --init-head: a new run (same recorded data) starts from the trained head: same draft vocabulary, a
    # first loss below the fresh head's, and with a negligible learning rate the same held-out acceptance
    init = tmp_path / "init"
    init.mkdir()
    for f in ("data.npz", "held_out.npz"):
        shutil.copy(out / f, init / f)
    assert main(_args(model, init, 2, "--init-head", str(out / "eagle-head.safetensors"), "--lr", "1e-9")) == 0
    _, params3 = load_eagle_head(init / "eagle-head.safetensors")
    np.testing.assert_array_equal(params3["d2t"], params["d2t"])
    _, meta3 = read_eagle_metadata(init / "eagle-head.safetensors")
    assert meta3["init_head"]["file"] == str(out / "eagle-head.safetensors")
    assert meta3["init_head"]["training"]["steps_run"] == 3
    hist3 = json.loads((init / "history.json").read_text())
    assert hist3["loss"][0] < 0.9 * loss[0], (hist3["loss"], loss)
    assert meta3["held_out_acceptance"]["mean_length"] == pytest.approx(acc["mean_length"], abs=0.05)


def test_prompt_sets_are_varied_and_held_out_topics_disjoint():
    train_topics, held_topics = prompts.split_topics(7)
    assert not set(train_topics) & set(held_topics) and len(held_topics) == 7
    train_everyday, held_everyday = everyday.split_everyday(0.1, held_topics)
    assert not set(train_everyday) & set(held_everyday) and len(held_everyday) >= 0.08 * len(train_everyday)
    train = prompts.prompt_set(600, 0, train_topics, train_everyday)
    held = prompts.prompt_set(60, 7, held_topics, held_everyday)
    assert len(set(train)) == 600
    assert not any(t.lower() in p.lower() for p in train for t in held_topics)
    assert not set(held) & set(train_everyday) and set(held) & set(held_everyday)
    # whole subjects held out: no held-out everyday prompt shares its subject with a training prompt
    subjects = [s for _, subs in everyday.FAMILIES.values() for s in subs]
    held_subjects = {s for s in subjects for p in held_everyday if s in p}
    assert held_subjects and not any(s in p for p in train for s in held_subjects)
    assert len({p.split()[0] for p in train}) >= 25  # many instruction styles
    assert 0.3 < sum(p in set(train_everyday) for p in train) / len(train) < 0.5
    assert prompts.prompt_set(50, 3) == prompts.prompt_set(50, 3)
    assert prompts.prompt_set(80, 3, everyday=train_everyday)[:50] == prompts.prompt_set(50, 3, everyday=train_everyday)
    with pytest.raises(ValueError, match="at most"):
        prompts.prompt_set(10_000, 0, ["one topic"])


def test_everyday_prompts_avoid_the_benchmark_prompts():
    """Training prompts must not be the acceptance benchmark's prompts (nor share a subject's key words)."""
    bench = json.loads((Path(__file__).parents[2] / "bench" / "chat_eval_prompts.json").read_text())["prompts"]
    pool = set(everyday.everyday_pool()) | set(prompts.prompt_set(1000, 0))
    assert not pool & set(bench)
    for word in ("faucet", "hiking", "grandmother", "sky", "bacteri", "procrastinat", "compound interest",
                 "bakery", "sofa", "airplanes stay", "refrigerator", "cover letter", "Canberra", "basketball"):
        assert not any(word.lower() in p.lower() for p in pool), word


def test_draft_vocabulary_and_coverage():
    seqs = [data.Sequence(np.array([9, 9, 1, 2, 2, 3, 2]), 2, True, None, np.array([0, 1, 2, 2, 3, 2, 5]))]
    counts = data.token_counts(seqs, 10)
    # reply tokens 1, 2, 2, 3, 2 plus greedy predictions at reply positions 1 .. 5: 1, 2, 2, 3, 2
    assert counts.tolist() == [0, 2, 6, 2, 0, 0, 0, 0, 0, 0]
    d2t = data.draft_vocabulary(counts, 2, always=(7,))
    assert d2t.tolist() == [2, 7]
    assert data.coverage(seqs, d2t) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="draft vocabulary size"):
        data.draft_vocabulary(counts, 0)
