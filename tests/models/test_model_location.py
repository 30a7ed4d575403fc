"""Hub ids versus paths, and a hub id without network: one clear line, in seconds, no hub traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.model_location import is_hub_id, resolve_model_path, served_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,hub", [("gpt2", True), ("Qwen/Qwen3-0.6B", True), ("meta-llama/Llama-3.1-8B", True),
                                      ("./gpt2", False), ("/models/gpt2", False), ("a/b/c", False), ("~/m", False),
                                      ("../x", False), ("org/..", False)])
def test_hub_ids_and_paths_are_told_apart(name, hub):
    assert is_hub_id(name) is hub


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match=r"path '.*/nope/model' does not exist"):
        resolve_model_path(str(tmp_path / "nope" / "model"))


def test_served_name_is_the_hub_id_or_the_directory_name(tmp_path):
    assert served_name("Qwen/Qwen3-0.6B", tmp_path / "snapshots" / "abc123") == "Qwen/Qwen3-0.6B"
    d = tmp_path / "my-model"
    d.mkdir()
    assert served_name(str(d), d) == "my-model"


def test_llm_gpt2_without_network_fails_in_seconds_with_one_line(tmp_path):
    # An endpoint that refuses connections stands in for "no network"; an empty HF_HOME for "not cached".
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    code = "import time; from folio import LLM\nt = time.monotonic()\ntry:\n    LLM('gpt2')\nfinally:\n" \
           "    print('resolve took', time.monotonic() - t)"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("ValueError: model: 'gpt2' is not a local directory nor in the hub cache, and the Hugging Face "
                    "hub (http://127.0.0.1:9) could not be reached to download it"), r.stderr
    assert "huggingface_hub" not in r.stderr and "During handling" not in r.stderr, r.stderr
    took = float(r.stdout.split("resolve took")[1])
    assert took < 5, f"LLM('gpt2') took {took:.1f}s to fail (process {time.monotonic() - t0:.1f}s)"
