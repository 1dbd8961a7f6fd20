"""`diffcoder eval ... --api-base`: the prompts go over real HTTP to our own server (`diffcoder serve`'s app under
uvicorn on loopback), infilling through the completions `suffix` field, and the answers are scored as a local run's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffcoder.cli import main
from diffcoder.errors import ConfigError
from diffcoder.evaluation.data import default_data_dir
from diffcoder.evaluation.harness import EvalConfig, read_records, run_eval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import LiveServer, free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not (default_data_dir() / "cruxeval.jsonl").is_file(),
                                reason="benchmark data not in ../shared/data or $DIFFCODER_DATA")
CONTEXT = 4096
DECODING = {"max_new_tokens": 12, "temperature": 0.0}


@pytest.fixture(scope="module")
def fim_ckpt(tmp_path_factory) -> Path:
    from diffcoder.testing import write_tiny_fim_checkpoint

    return write_tiny_fim_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fim", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def fim_server(fim_ckpt):
    s = LiveServer(fim_ckpt, max_batch=8, max_queue=64)
    yield s
    s.close()


def _codes(path: Path) -> dict[str, str]:
    return {r["task_id"]: r["code"] for r in read_records(path / "tasks.jsonl")}


@pytest.mark.parametrize(("benchmark", "variant", "style"), [("humaneval-infilling", "random-span-light", "fim"),
                                                             ("cruxeval", "output", "base")])
def test_served_model_scores_as_the_local_run(fim_ckpt, fim_server, tmp_path, benchmark, variant, style):
    """Greedy answers over HTTP (the server's default decoding: one token per step) are the local harness's."""
    common = dict(prompt_style=style, limit=3, variant=variant, batch_size=3, workers=2)
    local = run_eval(EvalConfig(benchmark, str(fim_ckpt), decoding={"max_new_tokens": 12}, **common),
                     tmp_path / "local", progress=False)
    served = run_eval(EvalConfig(benchmark, fim_server.model_name, decoding=DECODING, api_base=fim_server.base,
                                 **common), tmp_path / "api", progress=False)
    codes = _codes(tmp_path / "api")
    assert codes == _codes(tmp_path / "local") and len(codes) == 3 and any(codes.values())
    assert served["mode"] == "api" and served["api_base"] == fim_server.base
    assert served["generated_tokens"] > 0 and served["tokens_per_forward"] == 0.0  # forwards are the server's
    assert served["kinds"] == local["kinds"] and served["benchmark"] == local["benchmark"]


def test_cli_api_base_names_the_served_model(fim_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-recorded")
    out = tmp_path / "run"
    rc = main(["eval", "cruxeval", "--task", "input", "--api-base", fim_server.base + "/v1", "--limit", "2",
               "--max-new-tokens", "8", "--out", str(out), "--no-progress", "--workers", "2"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == fim_server.model_name and summary["tasks"] == 2  # from /v1/models
    assert "sk-test" not in (out / "config.json").read_text() + (out / "tasks.jsonl").read_text()


def test_api_errors_are_one_clear_line(tmp_path, capsys, fim_server):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="cannot reach .* is the server running"):
        run_eval(EvalConfig("cruxeval", "m", limit=1, variant="output", decoding=DECODING, api_base=dead),
                 tmp_path / "dead", progress=False)
    rc = main(["eval", "cruxeval", "--task", "output", "--api-base", fim_server.base, "--model", "x",
               "--out", str(tmp_path / "both")])
    assert rc == 2 and "leave out --model and --ar" in capsys.readouterr().err
    rc = main(["eval", "cruxeval", "--task", "output", "--api-base", fim_server.base, "--threshold", "none",
               "--out", str(tmp_path / "none")])
    assert rc == 2 and "--threshold none cannot be sent" in capsys.readouterr().err
    # The server's own refusal comes back with its message (here: a model name it does not serve)
    with pytest.raises(ConfigError, match="answered 4"):
        run_eval(EvalConfig("cruxeval", "no-such-model", limit=1, variant="output", decoding=DECODING,
                            api_base=fim_server.base), tmp_path / "wrong", progress=False)
