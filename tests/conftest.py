import logging

import pytest
import torch

import minift
from minift.pretrained import resolve

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch):
    """--precision auto takes bf16 on a CPU with AMX-BF16, and on one with AVX512-BF16 where a
    timed bf16 product is fast enough (minift.trainer): the tests' numbers would then depend on the
    CPU at hand. In this process every CPU looks like one with AVX512-BF16 and no bf16 gain, so
    auto is fp32; tests of the choice itself set their own, and tests that start minift in a
    subprocess pass --precision fp32 where they compare numbers."""
    from minift import trainer
    monkeypatch.setattr(trainer, "cpu_bf16_speed", lambda: "avx512")
    monkeypatch.setattr(trainer, "cpu_bf16_timing", lambda *a, **k: (1.0, 1.0))


@pytest.fixture(scope="session")
def minilm_dir():
    return resolve("minilm")


@pytest.fixture(scope="session")
def tokenizer():
    return minift.Tokenizer.from_pretrained("minilm")


@pytest.fixture(scope="session")
def batch(tokenizer):
    """A padded batch mixing single sentences, pairs, unicode and very different lengths."""
    texts = ["The film was a quiet, devastating triumph.", "Dull.",
             "Ünïcödé café naïve résumé — 東京 isn't hard", "What a mess of a movie, honestly"]
    pairs = ["Did the reviewer like it?", "no", "Accents and CJK", "a second segment that is long"]
    return tokenizer(texts, pairs=pairs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A small random BERT with the real vocabulary, saved in Hugging Face format, dropout off."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = minift.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    minift.BertModel(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def small_config(**kw):
    """A random small BERT with irregular sizes, for tests that do not need real weights."""
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                intermediate_size=80, max_position_embeddings=40, type_vocab_size=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return minift.BertConfig(**base)


def random_batch(config, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 2 * b:] = 0      # different amounts of padding
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    return ids, mask, types


@pytest.fixture(scope="session")
def built_site():
    """The course site, built once per test run with the tutorials' fast sizes: the build is where
    the tutorials execute (a failing cell fails it). Tests that use it carry
    ``pytest.mark.xdist_group("site")`` so that one worker builds it while the other runs the rest.
    Should the group ever be split across workers (pytest 9.2 ignores xdist_group), a file lock
    makes the second worker wait for the first one's build and use it, instead of running a second
    build into the same folders at the same time."""
    import fcntl
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")
    stamp = root / "docs" / "_build" / "built-by-test-run"
    (root / ".cache").mkdir(exist_ok=True)
    with open(root / ".cache" / "site-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == run:
            return root / "docs"
        env = {**os.environ, "MINIFT_TUTORIAL_FAST": "1"}
        r = subprocess.run(["bash", "scripts/docs.sh"], cwd=root, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"the site build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
        stamp.write_text(run)
    return root / "docs"


# The longest single tests, started first: pytest-xdist hands out work in collection order (after
# the groups with the most tests, "site" and "optim"), so a long test collected last (packaging
# sorts late) would run alone at the end while the other worker sits idle.
LONGEST_FIRST = ("test_packaging.py", "test_assignments.py", "test_build_modes.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 0 if item.path.name in LONGEST_FIRST else 1)     # a stable sort
