"""The tools around training on a corpus the test makes: prepare_data (bytes and a locally
trained BPE) -> train on `data=tokens data.path=DIR` with no other flag -> eval at world 1 and
under torchrun (the same loss) -> generate (text out); a `-m` sweep; train.sh answering --cfg
job and a bad option in one process."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import prepare_data
from launch.errors import UserError
from launch.train import compose_config
from tests.support.driver import Driver, hashes
from tests.support.launch import ENV, read_metrics, torchrun_cmd

TINY = [
    "model=gpt_moe_tiny",
    "model.n_layers=1",
    "train.global_batch_size=4",
    "train.seq_len=16",
    "train.log_every=1",
    "train.progress=false",
    "data.val_batches=1",
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "for", "in", "range", "print", "if", "élan"]
    for i in range(6):
        lines = [" ".join(rng.choice(words, 8)) + ":" for _ in range(300)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "sub").mkdir()
    (root / "sub" / "more.py").write_text("x = 1\n" * 200)
    (root / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")  # left out: not text
    return root


def test_prepare_data_writes_what_training_reads(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from launch.data.meta import read_meta

    out = tmp_path / "bytes"
    prepare_data.main(["--input", str(corpus), "--out", str(out)])
    meta = read_meta(out / "meta.json")
    assert meta["vocab_size"] == 256 and meta["counts"]["files"] == 7  # the .bin left out
    ids = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    raw = (corpus / "doc0.txt").read_bytes()  # the first file, sorted; its last 5% are val
    cut = len(raw) - math.ceil(0.05 * len(raw))
    assert bytes(ids[:cut].tolist()) == raw[:cut]  # ids are the bytes
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.decode(ids[:40].tolist()) == raw[:40].decode()
    c = meta["counts"]
    assert c["train_tokens"] + c["val_tokens"] == c["bytes"] and c["val_tokens"] > 0
    before = hashes(out)
    with pytest.raises(SystemExit) as e:  # an existing output is never overwritten silently
        prepare_data.main(["--input", str(corpus), "--out", str(out), "--tokenizer", "bpe:300"])
    assert e.value.code == 2 and hashes(out) == before
    with pytest.raises(UserError, match="vocabulary size must be an integer"):
        prepare_data.prepare([str(corpus)], tmp_path / "x", "bpe:12")


@pytest.fixture(scope="module")
def bpe(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "bpe"
    prepare_data.main(["--input", f"{corpus}/*.txt", "--out", str(out), "--tokenizer", "bpe:300"])
    return out


def test_tokens_config_comes_from_meta_json(bpe: Path) -> None:
    from launch.data.meta import read_meta

    vocab = read_meta(bpe / "meta.json")["vocab_size"]  # at most 300: what the corpus allows
    assert 256 < vocab <= 300
    job, _ = compose_config([*TINY, "data=tokens", f"data.path={bpe}"])
    assert job.data.vocab_size == job.model.vocab_size == vocab
    assert job.data.token_dtype == "uint16"
    with pytest.raises(UserError, match="data.vocab_size=256 contradicts .*meta.json"):
        compose_config(["data=tokens", f"data.path={bpe}", "data.vocab_size=256"])


def _run(module: str, *args: str, nproc: int = 0) -> str:
    cmd = (torchrun_cmd(nproc, list(args), module=module) if nproc
           else [sys.executable, "-m", module, *args])  # fmt: skip
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_prepare_train_eval_generate(
    bpe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch import generate

    run, sweep = tmp_path / "run", tmp_path / "sweep"
    with Driver() as d:
        got = d.run([*TINY, "parallel=fssdp", "data=tokens", f"data.path={bpe}",
                     "train.steps=2", f"hydra.run.dir={run}"])  # fmt: skip
        assert got["code"] == 0, got["stderr"][-3000:]
        assert re.search(r"gpt_moe_tiny with vocab_size=\d+, n_layers=1: [\d,.M]+ parameters, "
                         r"[\d,.M]+ active per token", got["stdout"]), got["stdout"]  # fmt: skip
        got = d.run(["-m", "seed=0,1", *TINY, "parallel=none", "data=synthetic",
                     "train.steps=1", f"hydra.sweep.dir={sweep}"])  # fmt: skip
        assert got["code"] == 0, got["stderr"][-3000:]
    assert [_seed(sweep / str(n)) for n in range(2)] == [0, 1]  # one run dir per combination
    assert "owners" in read_metrics(run)[0]  # fssdp logs who owns each expert
    before = hashes(run)
    out = _run("launch.eval", str(run), "--tokens", "256", "--batch", "4", "--parallel", "ep",
               nproc=2)  # fmt: skip
    assert hashes(run) == before  # eval writes nothing into the run directory
    loss = float(re.search(r"loss ([\d.]+) nats/token", out).group(1))
    assert "256 tokens (4 batches x 4 x 16" in out and "perplexity" in out, out
    assert math.isclose(loss, _reference_loss(run, 256, 16), rel_tol=1e-4)
    generate.main([str(run), "--prompt", "def self", "--tokens", "8"])
    assert capsys.readouterr().out.startswith("def self")  # text out, with the run's BPE


def _reference_loss(run: Path, tokens: int, seq: int) -> float:
    """The plain model (launch.consolidate, one process) on the consecutive val windows that
    launch.eval promises."""
    import torch
    import torch.nn.functional as F

    from launch.consolidate import load_full_model
    from launch.data import build_streams

    model, cfg, _ = load_full_model(run)
    val = build_streams(cfg.data)[1].tokens
    n = tokens // seq
    win = torch.from_numpy(np.asarray(val[: n * seq + 1], dtype=np.int64))
    x = torch.stack([win[i * seq : (i + 1) * seq] for i in range(n)])
    y = torch.stack([win[i * seq + 1 : (i + 1) * seq + 1] for i in range(n)])
    with torch.no_grad():
        return float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))


def _seed(run: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run / "config.yaml").seed)


def test_train_sh_answers_flags_in_one_process() -> None:
    """Not from each of 2 torchrun workers (train.sh routes any option but -m to one process;
    the unknown-option line itself is tested in tests/unit/test_cli_tools.py)."""
    p = subprocess.run(["bash", str(ROOT / "train.sh"), "--cfg", "job", "train.steps=3"],
                       env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and p.stdout.count("steps: 3") == 1, p.stderr[-2000:]
    assert "family: moeut" in p.stdout  # the default job's model (experiment=default_job)
    assert "torchrun" not in p.stderr and "ChildFailedError" not in p.stderr
