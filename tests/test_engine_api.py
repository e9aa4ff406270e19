"""Reshapes from Python on the offline `sglang.Engine` (remp_sglang.integration.engine_api).

The Engine runs in a subprocess of its own (it spawns schedulers and owns an event loop):
launched on 2 ranks at TP 1 (`remp_initial_tp=1`), it serves, reshapes to TP 2 and back,
and after each switch gives transformers' greedy tokens with the prompt still cached.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from remp_checks import NEW_TOKENS, transformers_greedy

from remp_sglang.testing.server import server_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    from remp_sglang.integration.engine_api import launch_engine, reshape

    def main():
        model, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        engine = launch_engine(
            model_path=model, tp_size=2, remp_initial_tp=1, device="cpu",
            attention_backend="torch_native", disable_cuda_graph=True,
            max_total_tokens=4096, mem_fraction_static=0.1, dtype="float32",
        )
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        out = {"runs": [], "reports": []}
        def run():
            r = engine.generate(input_ids=prompt, sampling_params=params)
            out["runs"].append([r["output_ids"], r["meta_info"]["cached_tokens"]])
        run()
        for tp in (2, 1):
            out["reports"].append(reshape(engine, tp=tp))
            run()
        try:
            reshape(engine, tp=3)
        except ValueError as error:
            out["bad"] = str(error)
        engine.shutdown()
        print("RESULT " + json.dumps(out), flush=True)

    if __name__ == "__main__":
        main()
""")


def test_engine_reshape_from_python(tiny_llama_dir, tmp_path):
    prompts, outputs = transformers_greedy(tiny_llama_dir)
    script = tmp_path / "engine_reshape.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_llama_dir), json.dumps(prompts[0]),
         str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=600, env=server_env(2),
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert [r["new"] for r in result["reports"]] == [{"dp": 1, "tp": 2, "pp": 1},
                                                        {"dp": 1, "tp": 1, "pp": 1}]
    for report in result["reports"]:
        assert report["cached_tokens_after"] == report["cached_tokens_before"] > 0
    assert [output_ids for output_ids, _ in result["runs"]] == [outputs[0]] * 3
    assert all(cached > 0 for _, cached in result["runs"][1:])
    assert "exceeds the 2 ranks" in result["bad"]
