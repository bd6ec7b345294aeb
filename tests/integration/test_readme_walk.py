"""The README walked as a new user walks it: every `memdiag` command of its code blocks that
this machine can run, from a directory outside the checkout, with the README's placeholders
(<run>, RUN_A, a model directory, a ds_config) filled by what the walk made. Each ends in 0
or 1 (a check with an error finding) without a traceback, and nothing lands in the checkout."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NEEDS_ELSEWHERE = ("/ckpt", "/data", "hostfile", "--hostfile", "srun ", "train.py --deepspeed ds.json", "demo 5290",
                   "memdiag top", "--calibrate", "nodes_here")
"""Commands that need what a test machine lacks (a 13B checkpoint, a dataset, ssh hosts, a
scheduler), take minutes (the demo, simulated nodes: their own tests run them) or a terminal."""
CHEAP = {"steps": "2", "seq_len": "64"}
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": False}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("memdiag ") and not any(n in line for n in NEEDS_ELSEWHERE):
                commands.append(line)
    return commands


def cheap(tokens: list[str]) -> list[str]:
    """A run command at the CPU case's smallest size (the README's keys kept)."""
    given = {t.split("=", 1)[0] for t in tokens if "=" in t}
    out = [f"{t.split('=', 1)[0]}={CHEAP[t.split('=', 1)[0]]}" if "=" in t and t.split("=", 1)[0] in CHEAP else t for t in tokens]
    return out + [f"{k}={v}" for k, v in CHEAP.items() if k not in given]


def test_the_readme_walked_from_a_directory_outside_the_checkout(tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    (home / "Llama-2-7b-hf").mkdir()
    (home / "Llama-2-7b-hf" / "config.json").write_text(json.dumps(LLAMA_2_7B))
    (home / "path" / "to" / "llama").mkdir(parents=True)
    (home / "path" / "to" / "llama" / "config.json").write_text(json.dumps(LLAMA_2_7B))
    (home / "ds_z3.json").write_text((REPO / "tests" / "data" / "ds_z3_offload_hf.json").read_text())
    env = os.environ | {"PYTHONPATH": str(REPO), "MEMDIAG_CACHE": str(tmp_path / "cache")}
    before = _checkout_state()

    runs: list[Path] = []
    walked = []
    for line in readme_commands():
        tokens = shlex.split(line)[1:]
        if re.search(r"<run>|\bRUN\w*", line):
            if not runs:
                continue  # a placeholder for a run the README's earlier lines make
            names = iter(runs * 4)
            tokens = [str(next(names)) if re.fullmatch(r"reports/baichuan2_13b/<run>|RUN\w*", t) else t for t in tokens]
        if tokens[0] == "run" and "--" not in tokens:
            tokens = cheap(tokens)
        result = subprocess.run([sys.executable, "-m", "memdiag", *tokens], cwd=home, env=env, capture_output=True,
                                text=True, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode in (0, 1) and "Traceback" not in output, f"{line}\n{output[-3000:]}"
        walked.append(line)
        if tokens[0] == "run":
            made = sorted((home / "reports" / "baichuan2_13b").iterdir())
            runs = [p for p in made if (p / "run.json").is_file()]
    assert len(walked) >= 12, walked
    assert runs and all(str(r).startswith(str(home)) for r in runs)
    assert _checkout_state() == before, "the walk wrote into the checkout"


def _checkout_state() -> tuple[str, list[str]]:
    """Untracked files of the checkout, and what its (ignored) reports/ holds."""
    untracked = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    reports = sorted(str(p.relative_to(REPO)) for p in (REPO / "reports").glob("*/*")) if (REPO / "reports").is_dir() else []
    return untracked, reports
